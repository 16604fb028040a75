"""A run started from `--model.init_adapter DIR` writes files that stand alone: they rebuild and resume without DIR."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST

from vision_lora.checkpoint import load_model
from vision_lora.cli import main
from vision_lora.data import preprocess_files


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_from_an_init_adapter_rebuilds_and_resumes_after_the_adapter_is_deleted(
    image_folder, backbone_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = [*FAST, f"--model.weights={backbone_file('test_resnet')}", f"--data.root={image_folder}"]
    main(["fit", *args, "--model.r=4", "--trainer.max_epochs=1", "--trainer.logger.init_args.name=first"])
    init_dir = tmp_path / "init_adapter"
    shutil.copytree(tmp_path / "runs" / "first" / "version_0" / "adapter", init_dir)

    # r=16 on the command line: the adapter's own options (r=4) win, and are what the checkpoint records.
    second = ["fit", *args, f"--model.init_adapter={init_dir}", "--model.r=16", "--trainer.logger.init_args.name=b"]
    main([*second, "--trainer.max_epochs=1", "--seed_everything=0"])
    run = tmp_path / "runs" / "b" / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    original = load_model(best)
    paths = sorted((image_folder / "test").rglob("*.png"))
    images = preprocess_files([str(p) for p in paths], original.data_config)
    labels = torch.tensor([original.class_names.index(p.parent.name) for p in paths])
    with torch.no_grad():
        before = original.model(images)
    shutil.rmtree(init_dir)

    trained = load_model(best)
    assert trained.model.lora_config.r == 4
    with torch.no_grad():
        torch.testing.assert_close(trained.model(images), before, rtol=0, atol=0)
    assert torch.load(best, weights_only=True)["vision_lora"]["init_adapter"] == str(init_dir)

    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])  # the accuracy of those logits
    accuracy = (before.argmax(1) == labels).float().mean().item()
    assert float(_metrics(run / "test")[-1]["test_acc"]) == pytest.approx(accuracy, abs=1e-6)
    main(["export", "--ckpt_path", str(best), "--output", "merged.safetensors", "--format", "timm"])
    assert (tmp_path / "merged.safetensors").stat().st_size > 10_000

    main([*second, "--trainer.max_epochs=2", "--seed_everything=0", "--ckpt_path=last"])
    epochs = sorted({int(r["epoch"]) for r in _metrics(run) if r.get("val_acc")})
    assert epochs == [0, 1]  # resumed into the same run for its second epoch
    assert sorted(p.name for p in (tmp_path / "runs" / "b").iterdir()) == ["version_0"]
