"""Shared by the CLI tests: fast CLI arguments, and callbacks loaded as `--trainer.callbacks+=helpers.X`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

# A tiny ConvNet on 32 px images, no augmentation randomness unless a test adds it, one log row per step.
FAST = [
    "--model.backbone=test_resnet",
    "--model.weights=random",  # the command's default is pretrained weights, which would need the hub
    "--model.lr=0.01",
    "--model.input_size=32",
    "--data.num_workers=0",
    "--data.batch_size=8",
    "--data.augment=standard",  # the random-resized crop below, whatever the folder size would pick
    "--data.hflip=0",
    "--data.scale=[0.8, 1.0]",
    "--data.color_jitter=null",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]


def slow_fit_args(image_folder, weights_file: str, *extra: str) -> list[str]:
    """`fit` arguments for the interrupt-and-resume tests: 3 epochs of slowed steps (`SlowSteps`) with 2 loader
    workers, seeded, so that a signal or a kill lands mid-training and a resumed run can be compared bit for bit."""
    return [
        "fit",
        *FAST,
        f"--data.root={image_folder}",
        f"--model.weights={weights_file}",
        "--seed_everything=7",
        "--trainer.max_epochs=3",
        "--data.num_workers=2",
        "--trainer.callbacks+=helpers.SlowSteps",
        *extra,
    ]


def cli_env() -> dict:
    """The environment for a `vision-lora` subprocess: this one, with tests/ importable (for `helpers.X` callbacks)."""
    here = str(Path(__file__).parent)
    return {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cli_command(*args: str) -> list[str]:
    """The command line of `vision-lora <args>` in a subprocess, with this interpreter."""
    return [sys.executable, "-m", "vision_lora.cli", *args]


def run_named(cwd: Path, args: list[str], name: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `vision-lora <args>` to completion as logger run `name` (5 minutes at most), output captured."""
    command = cli_command(*args, f"--trainer.logger.init_args.name={name}", *extra)
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


def start_named(cwd: Path, args: list[str], name: str) -> subprocess.Popen:
    """Start `vision-lora <args>` as logger run `name` in its own process group (to be killed as a whole)."""
    command = cli_command(*args, f"--trainer.logger.init_args.name={name}")
    out = subprocess.DEVNULL
    return subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=out, stderr=out, start_new_session=True)


def quiet_trainer(**overrides) -> L.Trainer:
    """A CPU Trainer for in-process tests: no logger, checkpoints, progress bar or model summary."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **overrides})


class Crash(RuntimeError):
    pass


class CrashMidEpoch(L.Callback):
    """Stops the run with an exception before batch `batch` of epoch `epoch`, like a crash would."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash(f"crash in epoch {self.epoch} before batch {self.batch}")


class DumpRankWeights(L.Callback):
    """At the end of fit each rank writes its trained tensors to `rank<N>.safetensors` in the working directory."""

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items() if "lora_" in k or "fc." in k}
        save_file(state, f"rank{trainer.global_rank}.safetensors")


class SlowSteps(L.Callback):
    """Makes every training step take a little longer, so that a test can kill a run in the middle of an epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(0.3)


class FailOnRank1(L.Callback):
    """Rank 1 of a DDP run raises at its third training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            raise RuntimeError("rank 1 failed on purpose")


class RecordKeys(L.Callback):
    """Each rank writes `keys-rank<N>.json`: the sample keys of every train and val batch it processed, by epoch."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def _record(self, trainer, stage: str) -> None:
        if not trainer.sanity_checking:
            self.seen.setdefault(f"{stage}{trainer.current_epoch}", []).extend(trainer.datamodule.batch_keys)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, "val")

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        with open(f"keys-rank{trainer.global_rank}.json", "w", encoding="utf-8") as f:
            json.dump(self.seen, f)


class NanThenSigterm(L.Callback):
    """At training step 7 a LoRA weight turns NaN (as after a diverging step) and the process sends itself SIGTERM."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import signal

        import torch

        if trainer.global_step == 7:
            with torch.no_grad():
                next(p for n, p in pl_module.named_parameters() if "lora_B" in n).fill_(float("nan"))
            os.kill(os.getpid(), signal.SIGTERM)


class FailOnFirstStep(L.Callback):
    """Fails the test run if any training step starts (for checks that must stop a run before its first step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise AssertionError("a training step started")


class AppendKeys(L.Callback):
    """Each rank appends a JSON line per train and val batch of `fit` to `keys-rank<N>.jsonl` in the working directory:
    stage, epoch, step and sample keys, written at once, so that a run stopped mid-epoch keeps what it trained on."""

    def _append(self, trainer, stage: str) -> None:
        import json

        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        line = {"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step}
        line["keys"] = list(trainer.datamodule.batch_keys)
        with open(f"keys-rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._append(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._append(trainer, "val")


def randomize_adapter(model, seed: int = 0, scale: float = 0.05, magnitude: float = 0.1) -> None:
    """Random LoRA B, head and DoRA magnitudes for `model` (LoRA applied), so that an adapter changes the outputs."""
    import torch

    from vision_lora.lora.targets import classifier_names

    gen = torch.Generator().manual_seed(seed)
    heads = tuple(f"{h}." for h in classifier_names(model))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith(heads):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "lora_magnitude" in n:
                p.mul_(1 + magnitude * torch.randn(p.shape, generator=gen))
