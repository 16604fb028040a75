from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_image_folder
from helpers import FAST
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from vision_lora.callbacks import BestCheckpoint
from vision_lora.cli import main
from vision_lora.recipe import AUGMENT_STANDARD_FROM, MAX_EPOCHS, MIN_EPOCHS, augment_for, epochs_for


def _recipe_lines(caplog) -> dict[str, str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe: ")]
    return {line.split("=")[0].removeprefix("recipe: "): line for line in lines}


def _saved_config(tmp_path: Path, name: str = "lightning_logs") -> dict:
    return yaml.safe_load((tmp_path / "runs" / name / "version_0" / "config.yaml").read_text())


def test_epochs_follow_the_dataset_size():
    assert epochs_for(36, 8) == MAX_EPOCHS  # 5 steps per epoch: capped
    assert epochs_for(800, 32) == 6  # 25 steps per epoch: about 150 steps
    assert epochs_for(100_000, 32) == MIN_EPOCHS
    assert augment_for(AUGMENT_STANDARD_FROM * 3 - 1, 3) == "light"
    assert augment_for(AUGMENT_STANDARD_FROM * 3, 3) == "standard"


def test_tiny_folder_gets_the_light_recipe_and_the_saved_config_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    per_class = AUGMENT_STANDARD_FROM - 1
    root = make_image_folder(tmp_path / "tiny", {"train": per_class, "val": 4, "test": 4})
    fast = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--data.augment=auto"]
    with caplog.at_level(logging.INFO):
        main(["fit", *FAST, *fast, f"--data.root={root}"])  # no epoch count
    printed = _recipe_lines(caplog)
    assert printed["data.augment"] == f"recipe: data.augment=light ({per_class} training images per class)"
    expected = f"recipe: trainer.max_epochs={MAX_EPOCHS} ({3 * per_class} training images"
    assert printed["trainer.max_epochs"].startswith(expected)
    config = _saved_config(tmp_path)
    assert config["data"]["augment"] == "light" and config["trainer"]["max_epochs"] == MAX_EPOCHS
    assert config["model"]["weights"] == "random"  # FAST's; the command's own default is "pretrained"
    metrics = (tmp_path / "runs/lightning_logs/version_0/metrics.csv").read_text()
    assert f"\n{MAX_EPOCHS - 1}," in metrics  # it ran the epochs it recorded


def test_large_folder_gets_the_standard_recipe(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "large", {"train": AUGMENT_STANDARD_FROM, "val": 2})
    fast = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--data.augment=auto"]
    with caplog.at_level(logging.INFO):
        main(["fit", *FAST, *fast, f"--data.root={root}", "--trainer.max_epochs=1"])  # epochs given: kept
    printed = _recipe_lines(caplog)
    assert printed == {"data.augment": f"recipe: data.augment=standard ({AUGMENT_STANDARD_FROM} training images "
                       "per class)"}  # fmt: skip
    config = _saved_config(tmp_path)
    assert config["data"]["augment"] == "standard" and config["trainer"]["max_epochs"] == 1


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
