"""Lightning plumbing around a run: crash-safe checkpoints, the best adapter at the end of fit, predictions CSV,
progress lines for logs without a terminal, the report of unreadable images."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from ._io import atomic_write, torch_bytes
from .errors import VisionLoRAError
from .lora.adapter import save_adapter

__all__ = [
    "AtomicCheckpointIO",
    "BadFileReport",
    "BestCheckpoint",
    "PlainProgress",
    "PredictionWriter",
    "SaveBestAdapter",
    "run_dir",
]

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run's outputs: the logger's version dir, else the trainer's root dir.

    Under DDP every rank must call this (it broadcasts rank 0's answer).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO that never leaves a torn file (temp file, fsync, rename) and never unpickles code on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write `checkpoint` atomically.

        Raises:
            VisionLoRAError: a weight is NaN or infinite: such a checkpoint is never written over a good one.
        """
        for key, value in checkpoint.get("state_dict", {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                raise VisionLoRAError(
                    f"Refusing to write {path}: {key} holds NaN or infinite values (training diverged)."
                )
        data = torch_bytes(checkpoint)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that a tie on the monitored metric goes to the lower `tie_break` metric.

    A small validation set saturates: with val_acc at 1.0 from the first epoch on, Lightning keeps that first epoch
    as "best" however much better later epochs fit. Here, with `save_top_k=1`, a later epoch with the same monitored
    value and a lower `tie_break` (val_loss: plain cross-entropy) becomes the best checkpoint instead.

    Args:
        tie_break: metric that decides between equal monitored values, lower is better; None keeps the first, as
            Lightning does.
        *args, **kwargs: those of ModelCheckpoint.
    """

    def __init__(self, *args: Any, tie_break: str | None = "val_loss", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tie_break = tie_break
        self._tie_value: float | None = None  # `tie_break` of the current best checkpoint

    @property
    def state_key(self) -> str:
        # Lightning's own key, so checkpoints written by a plain ModelCheckpoint resume with their best path.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if self.tie_break is None or self.save_top_k != 1 or current is None or self._tie_value is None:
            return False
        tie = trainer.callback_metrics.get(self.tie_break)
        best = self.best_k_models.get(self.kth_best_model_path)
        better = best is not None and tie is not None and bool(current == best) and float(tie) < self._tie_value
        return trainer.strategy.reduce_boolean_decision(better)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        tie = monitor_candidates.get(self.tie_break) if self.tie_break else None
        if self.save_top_k == 1:  # the checkpoint about to be written is the new best: its state records this
            self._tie_value = float(tie) if tie is not None else None
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tie_break": self.tie_break, "tie_value": self._tie_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("tie_break") == self.tie_break:
            self._tie_value = state_dict.get("tie_value")


class SaveBestAdapter(L.Callback):
    """At the end of fit, write the best checkpoint (by the checkpoint callback's monitor; the last weights when
    nothing is monitored) as an adapter directory `<run dir>/adapter`.

    Args:
        dirname: name of the adapter directory inside the run directory.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_dir(trainer) / self.dirname
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if best and Path(best).is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state)
        save_adapter(
            pl_module.model,
            out,
            class_names=pl_module.class_names,
            metadata={
                "backbone": pl_module.hparams.backbone,
                "weights": pl_module.hparams.weights,
                "data_config": pl_module.data_config,
                "checkpoint": str(best) if best else None,
                **_task_metadata(pl_module),
            },
        )
        pl_module.load_state_dict(current)
        rank_zero_info(f"Adapter of the best checkpoint written to {out}")


def _task_metadata(pl_module: L.LightningModule) -> dict:
    """The task (and the per-class thresholds of a multi-label model) for adapter and export metadata."""
    if getattr(pl_module, "task", "multiclass") != "multilabel":
        return {}
    return {"task": "multilabel", "thresholds": [float(t) for t in pl_module.thresholds.tolist()]}


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.csv` in the run directory: path, predicted class, confidence and the top-5; for a
    multi-label model path, labels (a JSON list of the classes at or over their thresholds) and one score column
    per class.

    Args:
        filename: name of the CSV file inside the run directory, or an absolute path.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}-rank{trainer.global_rank}{name.suffix or '.csv'}")
        self.path = run_dir(trainer) / name  # an absolute filename stays as it is
        self.path.parent.mkdir(parents=True, exist_ok=True)
        multilabel = getattr(pl_module, "task", "multiclass") == "multilabel"
        header = (
            ["path", "labels", *pl_module.class_names] if multilabel else ["path", "prediction", "confidence", "top5"]
        )
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(header)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        names = pl_module.class_names
        probs = prediction["probs"].float().cpu()
        if "thresholds" in prediction:  # multi-label
            chosen = probs >= prediction["thresholds"].float().cpu()  # (B, C)
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for path, ps, hits in zip(prediction["paths"], probs.tolist(), chosen.tolist(), strict=True):
                    labels = json.dumps([n for n, hit in zip(names, hits, strict=True) if hit], ensure_ascii=False)
                    writer.writerow([path, labels, *(f"{p:.6f}" for p in ps)])
            return
        k = min(5, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1) if len(probs) else (probs, probs.long())
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for path, ps, idx in zip(prediction["paths"], top_p.tolist(), top_i.tolist(), strict=True):
                top5 = ";".join(f"{names[i]}:{p:.4f}" for p, i in zip(ps, idx, strict=True))
                writer.writerow([path, names[idx[0]], f"{ps[0]:.4f}", top5])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Predictions written to {self.path}")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _metric_text(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(metrics.items()):
        if key.endswith("_step") or key.startswith("lr-") or f"{key}_epoch" in metrics:
            continue
        value = float(value)
        if "acc" in key or key.endswith("_f1"):  # rates: float accumulation may leave them a hair above 1
            value = min(value, 1.0)
        parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)


class PlainProgress(ProgressBar):
    """Progress for a log file (no terminal): a plain line every `every_n_steps` training steps or `interval_s`
    seconds, whichever comes first, and at the end of every epoch: epoch, step/total, loss, images/s and the ETA of
    the training (at this epoch's pace, validation not counted); then one line with the epoch's metrics.

    Args:
        interval_s: seconds between lines at most.
        every_n_steps: steps between lines at most; 0: by time only.
    """

    def __init__(self, interval_s: float = 30.0, every_n_steps: int = 0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._train_start = self._last = 0.0
        self._images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, line: str) -> None:
        if self._enabled:
            print(line, flush=True)

    def _due(self, done: int, total: float) -> bool:
        now = time.monotonic()
        due = now - self._last >= self.interval_s or done == total
        due = due or (self.every_n_steps > 0 and done % self.every_n_steps == 0)
        if due:
            self._last = now
        return due

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = self._last = time.monotonic()
        self._images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[0])
        done, total = batch_idx + 1, self.total_train_batches
        if not self._due(done, total):
            return
        elapsed = max(time.monotonic() - self._train_start, 1e-9)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch
        left = total - done + (total * (epochs - 1 - epoch) if epochs else 0)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f"  loss {float(loss):.4f}" if loss is not None else ""
        total_text = "?" if not math.isfinite(total) else str(int(total))
        self._say(
            f"epoch {epoch + 1}/{epochs or '?'}  step {done}/{total_text}{loss_text}  "
            f"{self._images / elapsed:.1f} images/s  ETA {_clock(elapsed / done * left)}"
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        text = _metric_text(dict(trainer.callback_metrics))
        self._say(f"epoch {trainer.current_epoch + 1} done in {_clock(time.monotonic() - self._train_start)}: {text}")

    def _eval_start(self) -> None:
        self._last = time.monotonic()

    def _eval_batch(self, trainer: L.Trainer, stage: str, done: int, total: float) -> None:
        if trainer.state.fn == "fit" or not self._due(done, total):
            return
        self._say(f"{stage}: batch {done}/{total if not math.isfinite(total) else int(total)}")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start()

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "validate", batch_idx + 1, trainer.num_val_batches[dataloader_idx])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "test", batch_idx + 1, trainer.num_test_batches[dataloader_idx])

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "predict", batch_idx + 1, trainer.num_predict_batches[dataloader_idx])


class BadFileReport(L.Callback):
    """Reports the unreadable images a DataModule skipped, at the end of each train, val, test and predict epoch
    (see `ImageFolderDataModule.report_bad_files`)."""

    def _report(self, trainer: L.Trainer, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not trainer.sanity_checking and hasattr(datamodule, "report_bad_files"):
            datamodule.report_bad_files(stage)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "predict")
