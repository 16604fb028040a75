"""Files written by an older vision_lora must still load: the run in `fixtures/main_r2` (config.yaml, best.ckpt and
its data) was written by main at cb9994b; `expected.json` holds what that code's `vision-lora test` reported."""

from __future__ import annotations

import csv
import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vision_lora.checkpoint import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "main_r2"


def _copy_run(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The fixture copied under `tmp_path`, its config pointed at the copied data and at `tmp_path` for output."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    cfg["data"]["root"] = str(run / "data")
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "root")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    return cfg_path, run / "best.ckpt", expected


def _test_metrics(tmp_path: Path) -> dict[str, str]:
    """The row holding test_acc of the one metrics.csv under `tmp_path` that has a test_acc column."""
    found = []
    for path in sorted(tmp_path.rglob("metrics.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if row.get("test_acc")]
        if rows:
            found.append((path, rows))
    assert len(found) == 1, f"expected one metrics.csv with test_acc under {tmp_path}, found {[p for p, _ in found]}"
    path, rows = found[0]
    assert len(rows) == 1, f"{path} has {len(rows)} test_acc rows"
    return rows[0]


def _image_tensor(path: Path, data_config: dict) -> torch.Tensor:
    """One image as the model's (1, 3, H, W) input: RGB, bicubic resize to input_size, mean / std normalised."""
    _, height, width = data_config["input_size"]
    img = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_old_run_tests_to_the_old_numbers(tmp_path, monkeypatch):
    """`vision-lora test` on cb9994b's config and checkpoint reports cb9994b's test_acc and test_loss."""
    from vision_lora.cli import main

    cfg, ckpt, expected = _copy_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar=false"])
    row = _test_metrics(tmp_path)
    assert float(row["test_acc"]) == pytest.approx(expected["test_acc"], abs=1e-6)
    assert float(row["test_loss"]) == pytest.approx(expected["test_loss"], abs=1e-6)


def test_old_config_logger_and_checkpoint_load():
    """The config's logger class path still resolves, and the checkpoint loads with its classes and its logits."""
    from lightning.pytorch.loggers import Logger

    cfg = yaml.safe_load((FIXTURE / "config.yaml").read_text(encoding="utf-8"))
    class_path = cfg["trainer"]["logger"]["class_path"]
    assert class_path == "vision_lora.runs.RunLogger"
    module_name, _, class_name = class_path.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module_name), class_name), Logger)

    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    classes = sorted(p.name for p in (FIXTURE / "data" / "test").iterdir() if p.is_dir())
    assert classes == expected["class_names"]
    trained = load_model(ckpt_path=FIXTURE / "best.ckpt")
    assert list(trained.class_names) == classes
    with torch.no_grad():
        logits = trained.model.eval()(_image_tensor(FIXTURE / expected["logits"]["image"], trained.data_config))
    assert logits.shape == (1, len(classes))
    assert all(math.isfinite(v) for v in logits.flatten().tolist())
    assert logits.flatten().tolist() == pytest.approx(expected["logits"]["values"], abs=1e-4)
