from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_image_folder
from helpers import FAST, Crash
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from vision_lora.callbacks import BestCheckpoint
from vision_lora.cli import main
from vision_lora.recipe import Length, _with_imbalance, candidates_for, imbalance_of, length_for


def _recipe_lines(caplog) -> dict[str, str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe: ")]
    return {line.split("=")[0].removeprefix("recipe: "): line for line in lines}


def _saved_config(tmp_path: Path, name: str = "lightning_logs") -> dict:
    return yaml.safe_load((tmp_path / "runs" / name / "version_0" / "config.yaml").read_text())


def test_length_rules_keep_a_screened_fit_within_twice_one_run():
    assert length_for(1257, 32, 2) == Length(rung=1, patience=1, min_epochs=2, max_epochs=15)  # the digits
    assert length_for(36, 8, 3) == Length(rung=8, patience=8, min_epochs=16, max_epochs=100)  # 5 steps per epoch
    for images in (10, 36, 120, 1257, 50_000):
        for batch in (8, 32, 256):
            for candidates in (1, 2, 3):
                length = length_for(images, batch, candidates)
                # The losers' epochs never exceed the winner's own: steps of a fit <= 2x one run of its length.
                assert (candidates - 1) * length.rung <= length.min_epochs <= length.max_epochs
                assert length.rung < length.min_epochs and length.patience >= 1
    assert [c.name for c in candidates_for(0.5)] == ["light", "standard"]
    assert [c.name for c in candidates_for(0.0)] == ["none", "standard"]  # without flips, light is none


def _screen_args(root: Path) -> list[str]:
    # One step per image: a rung of one epoch, the length decided by the curve (no epoch count).
    return ["fit", *FAST, f"--data.root={root}", "--data.augment=auto", "--data.batch_size=1", "--seed_everything=1"]


def test_screen_tries_each_candidate_continues_the_best_and_records_the_decision(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "data", {"train": 14, "val": 4, "test": 4})
    with caplog.at_level(logging.INFO):
        main(_screen_args(root))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe: ")]
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    table = list(csv.DictReader(open(run / "screen.csv")))
    assert [row["candidate"] for row in table] == ["none", "standard"]
    assert all(int(row["epochs"]) >= 1 for row in table)
    winner = next(row for row in table if row["winner"] == "1")
    loser = next(row for row in table if row["winner"] == "0")
    # Ranked on val_acc, ties to the lower val_loss.
    key = lambda row: (float(row["val_acc"]), -float(row["val_loss"]))  # noqa: E731
    assert key(winner) >= key(loser)
    assert any(f"{winner['candidate']:<12}" in line and "<- continued" in line for line in lines)
    # The run trained the loser's rung and then the winner; the steps printed stay within twice the winner's own.
    steps_line = next(line for line in lines if "optimizer steps" in line)
    total, own = int(steps_line.split("steps ")[1].split(" ")[0]), int(winner["steps"])
    assert total == own + int(loser["steps"]) and total <= 2 * own
    # The best checkpoint is the winner's (no loser's checkpoint is left), and the config reruns the winner.
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("best*.ckpt"))
    assert len(checkpoints) == 1
    best_epoch = int(checkpoints[0].split("epoch=")[1][:2])
    assert best_epoch >= int(loser["epochs"]) or winner["candidate"] == "none"
    config = _saved_config(tmp_path)
    assert config["data"]["augment"] == winner["candidate"] and config["recipe"] == "off"
    assert config["trainer"]["max_epochs"] is None and config["model"]["schedule"] == "constant"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(run / "config.yaml"), "--trainer.logger.init_args.version=1"])
    assert not any("screening" in r.getMessage() for r in caplog.records)
    rerun = yaml.safe_load((run.parent / "version_1" / "config.yaml").read_text())
    assert rerun["data"]["augment"] == winner["candidate"]


def test_screen_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "data", {"train": 14, "val": 4})
    main([*_screen_args(root), "--trainer.logger.init_args.name=straight"])
    stopped = [*_screen_args(root), "--trainer.logger.init_args.name=stopped"]
    with pytest.raises(Crash):  # in the second candidate's rung
        main([*stopped, "--trainer.callbacks+=helpers.CrashMidEpoch", "--trainer.callbacks.init_args.epoch=1"])
    main([*stopped, "--ckpt_path=last"])
    for name in ("screen.csv", "adapter/adapter.safetensors"):
        straight = (tmp_path / "runs/straight/version_0" / name).read_bytes()
        assert (tmp_path / "runs/stopped/version_0" / name).read_bytes() == straight, name


def test_recipe_off_or_a_given_augmentation_means_no_screen(image_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    fast = ["fit", *FAST, f"--data.root={image_folder}", "--trainer.limit_train_batches=1"]
    with caplog.at_level(logging.INFO):
        main([*fast, "--data.augment=auto", "--recipe=off", "--trainer.max_epochs=1"])
        main([*fast, "--trainer.max_epochs=1"])  # FAST gives data.augment
    assert not any("screening" in r.getMessage() for r in caplog.records)
    assert _saved_config(tmp_path)["data"]["augment"] == "light"  # off: the plain loop's
    assert _saved_config(tmp_path)["model"]["schedule"] == "auto"  # a given length: cosine


def test_baseline_head_trains_the_probe_first_and_prints_both(image_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        main(["fit", *FAST, f"--data.root={image_folder}", "--trainer.max_epochs=2", "--baseline=head"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    result = json.loads((run / "baseline.json").read_text())
    assert result["head_only"]["split"] == result["lora"]["split"] == "test"
    assert result["lora_gain_pt"] == pytest.approx(100 * (result["lora"]["accuracy"] - result["head_only"]["accuracy"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("baseline: ")]
    assert len(lines) == 3 and "head-only test_acc=" in lines[0] and "LoRA      test_acc=" in lines[1]
    # The probe trained the head alone (LoRA stayed at zero), the LoRA run trained LoRA, into their own folders.
    probe = torch.load(result["head_only"]["checkpoint"], weights_only=True)["state_dict"]
    lora = torch.load(result["lora"]["checkpoint"], weights_only=True)["state_dict"]
    assert Path(result["head_only"]["checkpoint"]).parent == run / "baseline_head" / "checkpoints"
    assert all(not v.any() for k, v in probe.items() if "lora_B" in k)
    assert any(v.any() for k, v in lora.items() if "lora_B" in k)
    assert not torch.equal(probe["model.fc.weight"], lora["model.fc.weight"])
    assert _saved_config(tmp_path)["baseline"] == "head"
    # The probe is the plain loop: constant 1e-3, no smoothing, 10 epochs, whatever the run's own recipe.
    probe_hparams = yaml.safe_load((run / "baseline_head" / "hparams.yaml").read_text())
    assert probe_hparams["schedule"] == "constant" and probe_hparams["label_smoothing"] == 0.0
    assert probe_hparams["lr"] == 1e-3 and probe_hparams["head_lr"] is None and probe_hparams["head_warmup"] == 1.0
    epochs = {row.split(",")[0] for row in (run / "baseline_head" / "metrics.csv").read_text().splitlines()[1:]}
    assert len(epochs) == 10


class _SaturatedVal(L.LightningModule):
    """val_acc is 1.0 from the first epoch on (a small, easy val split); val_loss keeps falling."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", 1.0)
        self.log("val_loss", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _best_epoch(tmp_path: Path, callback: BestCheckpoint) -> int:
    data = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)
    trainer = L.Trainer(
        max_epochs=4, callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(_SaturatedVal(), data, data)
    return int(Path(callback.best_model_path).stem.split("epoch=")[1].split("-")[0])


def test_a_tie_on_val_acc_goes_to_the_lower_val_loss(tmp_path):
    def checkpoint(folder: str, **kwargs) -> BestCheckpoint:
        return BestCheckpoint(dirpath=tmp_path / folder, monitor="val_acc", filename="best-{epoch}", **kwargs)

    assert _best_epoch(tmp_path, checkpoint("lightning", tie_break=None, mode="max")) == 0  # Lightning's: first stays
    assert _best_epoch(tmp_path, checkpoint("ours", mode="max")) == 3
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["best-epoch=3.ckpt"]
    # Its state is filed under Lightning's own key (older checkpoints resume), with the val_loss of the best.
    plain = ModelCheckpoint(dirpath=tmp_path / "ours", monitor="val_acc", mode="max", filename="best-{epoch}")
    assert checkpoint("ours", mode="max").state_key == plain.state_key
    resumed = checkpoint("ours", mode="max")
    resumed.load_state_dict(torch.load(tmp_path / "ours" / "best-epoch=3.ckpt")["callbacks"][plain.state_key])
    assert resumed._tie_value == pytest.approx(0.25)
    assert Path(resumed.best_model_path).name == "best-epoch=3.ckpt"


@pytest.mark.slow
def test_screen_under_ddp_decides_the_same_on_both_ranks(tmp_path):
    root = make_image_folder(tmp_path / "data", {"train": 14, "val": 4})
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [*_screen_args(root), "--trainer.devices=2", "--trainer.strategy=ddp"]
    args += ["--trainer.callbacks+=helpers.DumpRankWeights"]
    result = subprocess.run([sys.executable, "-m", "vision_lora.cli", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    table = list(csv.DictReader(open(run / "screen.csv")))
    assert [row["candidate"] for row in table] == ["none", "standard"] and sum(int(r["winner"]) for r in table) == 1
    assert len(list((run / "checkpoints").glob("best*.ckpt"))) == 1
    assert result.stderr.count("<- continued") + result.stdout.count("<- continued") == 1  # printed by rank 0 only


def test_imbalanced_classes_screen_balanced_sampling_and_class_weights_on_balanced_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "data", {"train": 12, "val": 4})
    classes = sorted(p.name for p in (root / "train").iterdir())
    for path in sorted((root / "train" / classes[0]).iterdir())[3:]:  # 3 images of the first class, 12 of the others
        path.unlink()
    main(_screen_args(root))
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    table = list(csv.DictReader(open(run / "screen.csv")))
    assert [row["candidate"] for row in table] == ["none", "standard", "none+balanced", "none+weighted"]
    assert "val_balanced_acc" in table[0] and len(list((run / "checkpoints").glob("best-*val_balanced_acc*"))) == 1
    winner = next(row for row in table if row["winner"] == "1")
    options = dict(option.split("=") for option in winner["options"].split())
    saved = _saved_config(tmp_path)
    assert saved["data"]["sampler"] == options["data.sampler"]
    assert saved["model"]["class_weights"] == options["model.class_weights"]
    assert saved["checkpoint"]["monitor"] == "val_balanced_acc"
    # A user's choice of either is never overridden: no imbalance candidates then.
    main([*_screen_args(root), "--data.sampler=shuffle", "--trainer.logger.init_args.name=given"])
    given = tmp_path / "runs" / "given" / "version_0"
    assert [row["candidate"] for row in csv.DictReader(open(given / "screen.csv"))] == ["none", "standard"]


def test_imbalance_ratio_and_candidates():
    assert imbalance_of([3, 12, 12]) == 4.0 and imbalance_of(None) == 1.0 and imbalance_of([0, 5, 5]) == 1.0
    names = [c.name for c in _with_imbalance(candidates_for(0.5))]
    assert names == ["light", "standard", "light+balanced", "light+weighted"]
