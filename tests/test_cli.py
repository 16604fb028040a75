from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import FAST, Crash
from safetensors.torch import load_file

from vision_lora import load_adapter, read_adapter_config
from vision_lora.cli import main


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _only(pattern: str, where: Path) -> Path:
    found = sorted(where.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_fit_test_predict_end_to_end(image_folder, backbone_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = f"--model.weights={backbone_file('test_resnet')}"
    main(["fit", *FAST, weights, f"--data.root={image_folder}", "--trainer.max_epochs=4", "--seed_everything=0"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file()
    val_acc = [float(r["val_acc"]) for r in _metrics(run) if r.get("val_acc")]
    assert val_acc[-1] >= 0.9

    best = _only("best-*.ckpt", run / "checkpoints")
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == ["blue ünïcode", "green", "red square"]
    assert ckpt["hyper_parameters"]["data_config"]["input_size"] == [3, 32, 32]

    # The adapter of the best checkpoint, reloaded on a fresh base model, classifies like the checkpoint.
    info = read_adapter_config(run / "adapter")
    assert info["class_names"] == ["blue ünïcode", "green", "red square"] and Path(info["checkpoint"]).name == best.name
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    for key, value in adapter.items():
        torch.testing.assert_close(value, ckpt["state_dict"][f"model.{key}"], rtol=0, atol=0)

    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])  # the best of the config's newest run
    test_run = run / "test"
    test_acc = [float(r["test_acc"]) for r in _metrics(test_run) if r.get("test_acc")]
    assert test_acc == [pytest.approx(test_acc[0])] and test_acc[0] >= 0.9
    with open(test_run / "confusion_matrix.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["blue ünïcode", "green", "red square"]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 12
    assert (test_run / "confusion_matrix.png").stat().st_size > 1000

    # Predict from the checkpoint alone: backbone, classes and preprocessing all come from it.
    predict = [
        "predict",
        f"--data.predict_dir={image_folder / 'test'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]
    main([*predict, "--ckpt_path", str(best)])
    with open(run / "predict" / "predictions.csv", newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    main([*predict, "--ckpt_path", "best", "--output", "mine.csv"])  # no config: the default runs/lightning_logs
    assert (tmp_path / "mine.csv").read_bytes() == (run / "predict" / "predictions.csv").read_bytes()
    main(["export", "--ckpt_path", "last", "--output", "merged.safetensors", "--format", "timm"])
    assert (tmp_path / "merged.safetensors").stat().st_size > 10_000
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # test, predict and export added no run
    assert len(predictions) == 12
    correct = sum(Path(p["path"]).parent.name == p["prediction"] for p in predictions)
    assert correct >= 11
    assert all(0 <= float(p["confidence"]) <= 1 and p["top5"].count(":") == 3 for p in predictions)


def test_checkpoint_holds_only_what_trains(image_folder, backbone_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            *FAST,
            f"--data.root={image_folder}",
            "--trainer.max_epochs=1",
            "--model.backbone=test_vit",
            f"--model.weights={backbone_file('test_vit')}",
            "--model.input_size=160",
            "--trainer.logger=TensorBoardLogger",  # in the [dev] extra; the CSV logger is the default
        ]
    )
    assert _only("runs/lightning_logs/version_0/events.out.tfevents.*", tmp_path).stat().st_size > 0
    ckpt_path = _only("runs/lightning_logs/version_0/checkpoints/last.ckpt", tmp_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = timm.create_model("test_vit", num_classes=3)
    trained = sum(v.numel() for v in ckpt["state_dict"].values())
    assert all("lora_" in k or k.startswith("model.head.") for k in ckpt["state_dict"])
    assert trained < 0.2 * sum(p.numel() for p in model.parameters())
    adam = sum(t.numel() for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values() if t.ndim)
    assert adam == 2 * trained
    assert ckpt_path.stat().st_size < 1.25 * 4 * 3 * trained + 200_000  # params + 2 Adam moments + metadata


def test_resume_continues_with_the_same_next_step_loss(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        *FAST,
        f"--data.root={image_folder}",
        "--seed_everything=3",
        "--data.num_workers=2",
        "--data.scale=[0.5, 1.0]",
        "--data.hflip=0.5",
    ]
    main(["fit", *args, "--trainer.max_epochs=2", "--trainer.logger.init_args.name=straight"])
    with pytest.raises(Crash):
        main(
            [
                "fit",
                *args,
                "--trainer.max_epochs=2",
                "--trainer.logger.init_args.name=stopped",
                "--trainer.callbacks+=helpers.CrashMidEpoch",
            ]
        )
    last = tmp_path / "runs" / "stopped" / "version_0" / "checkpoints" / "last.ckpt"
    main(["fit", *args, "--trainer.max_epochs=2", "--trainer.logger.init_args.name=resumed", "--ckpt_path", str(last)])

    def step_losses(name):
        rows = _metrics(tmp_path / "runs" / name / "version_0")
        return {int(r["step"]): float(r["train_loss_step"]) for r in rows if r.get("train_loss_step")}

    straight, resumed = step_losses("straight"), step_losses("resumed")
    # The curves' history crossed the restart: epoch 0 came from the stopped run's checkpoint.
    resumed_last = torch.load(tmp_path / "runs/resumed/version_0/checkpoints/last.ckpt", weights_only=True)
    assert [row["epoch"] for row in resumed_last["callbacks"]["History"]["epochs"]] == [0, 1]
    assert (tmp_path / "runs/resumed/version_0/curves.png").is_file()
    assert resumed and min(resumed) == 5  # 36 images / 8 per batch: 5 steps per epoch, resumed at step 5
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step


def test_missing_data_root_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *FAST, "--data.root=/no/such/folder"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vision-lora: error:") and "/no/such/folder" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_unknown_backbone_suggests_names(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", *FAST, f"--data.root={image_folder}", "--model.backbone=test_resnett"])
    assert "test_resnet" in capsys.readouterr().err


def test_print_config_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "backbone:",
        "lora_alpha:",
        "target_modules:",
        "qkv_slices:",
        "use_dora:",
        "rank_pattern:",
        "init_adapter:",
        "batch_size:",
        "max_bad_fraction:",
        "monitor: val_acc",
    ):
        assert option in out


def test_ddp_two_processes_on_cpu(image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "vision_lora.cli",
        "fit",
        *FAST,
        f"--data.root={image_folder}",
        "--trainer.max_epochs=2",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.callbacks+=helpers.DumpRankWeights",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and any("lora_B" in k for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # it trained
    runs = list((tmp_path / "runs" / "lightning_logs").iterdir())
    assert len(runs) == 1
    ckpts = sorted(p.name for p in (runs[0] / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts  # one best checkpoint and last, written once
    # The confusion matrix and errors of the extra validation pass hold every validation image once, from both ranks.
    with open(runs[0] / "confusion_matrix.csv", newline="", encoding="utf-8") as f:
        assert sum(int(v) for row in list(csv.reader(f))[1:] for v in row[1:]) == 12
    with open(runs[0] / "errors.csv", newline="", encoding="utf-8") as f:
        errors = list(csv.DictReader(f))
    assert len({e["path"] for e in errors}) == len(errors) and all(Path(e["path"]).is_file() for e in errors)
    assert (runs[0] / "curves.png").is_file() and (runs[0] / "errors.png").is_file()
    # Rank 0 alone wrote the adapter, and it is the best checkpoint's trained tensors.
    best_name = Path(read_adapter_config(runs[0] / "adapter")["checkpoint"]).name
    best = torch.load(runs[0] / "checkpoints" / best_name, weights_only=True)["state_dict"]
    adapted = load_adapter(timm.create_model("test_resnet", num_classes=3), runs[0] / "adapter")
    for key, value in adapted.state_dict().items():
        if "lora_" in key or key.startswith("fc."):
            torch.testing.assert_close(value, best[f"model.{key}"], rtol=0, atol=0)


def test_export_from_checkpoint_and_adapter(image_folder, backbone_file, tmp_path, monkeypatch):
    import onnxruntime as ort
    from timm.data import create_transform

    from vision_lora import LoRAClassifier, load_rgb
    from vision_lora.deploy import read_onnx_metadata

    monkeypatch.chdir(tmp_path)
    weights = backbone_file("test_resnet")
    main(["fit", *FAST, f"--model.weights={weights}", f"--data.root={image_folder}", "--trainer.max_epochs=2"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    best = _only("best-*.ckpt", run / "checkpoints")
    main(["export", "--ckpt_path", str(best), "--output", "from_ckpt.onnx", f"--verify_dir={image_folder / 'test'}"])
    main(["export", "--adapter", str(run / "adapter"), "--output", "from_adapter.onnx"])
    main(["export", "--ckpt_path", str(best), "--output", "merged.safetensors", "--format", "timm"])

    meta = read_onnx_metadata("from_ckpt.onnx")
    assert meta["class_names"] == ["blue ünïcode", "green", "red square"]
    assert meta["input_size"] == [3, 32, 32] and meta["backbone"] == "test_resnet"
    assert read_onnx_metadata("from_adapter.onnx")["input_size"] == [3, 32, 32]

    # Both ONNX files classify the test images exactly as the merged timm checkpoint does, with the metadata's
    # preprocessing, and the checkpoint reproduces the trained module's logits.
    transform = create_transform(**{k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")})
    x = torch.stack([transform(load_rgb(p)) for p in sorted((image_folder / "test").rglob("*.png"))])
    merged = timm.create_model("test_resnet", num_classes=3, checkpoint_path="merged.safetensors").eval()
    module = LoRAClassifier.load_from_checkpoint(best, weights=weights).eval()
    with torch.no_grad():
        expected = merged(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    for name in ("from_ckpt.onnx", "from_adapter.onnx"):
        logits = ort.InferenceSession(name, providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})
        assert abs(logits[0] - expected.numpy()).max() < 1e-4
        assert (logits[0].argmax(1) == expected.numpy().argmax(1)).all()


def test_dora_fit_exports_to_onnx_and_peft_and_a_peft_adapter_trains_on(
    image_folder, backbone_file, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from vision_lora.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    weights = backbone_file("test_resnet")
    args = [*FAST, f"--model.weights={weights}", f"--data.root={image_folder}", "--trainer.max_epochs=1"]
    main(["fit", *args, "--model.use_dora=true", '--model.rank_pattern={"layer1": 2}'])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_config"]["use_dora"] and adapter["lora_config"]["rank_pattern"] == {"layer1": 2}
    main(["export", "--adapter", str(run / "adapter"), "--output", "dora.onnx"])
    main(["export", "--adapter", str(run / "adapter"), "--output", "peft", "--format", "peft"])
    tensors = load_file("peft/adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)

    # The PEFT adapter is a starting point: fit on it, and the run's adapter exports as usual.
    main(["fit", *args, "--model.init_adapter=peft", "--trainer.max_epochs=1"])
    second = tmp_path / "runs" / "lightning_logs" / "version_1"
    trained = load_model(adapter=second / "adapter")
    assert trained.model.lora_config.use_dora and trained.model.lora_config.qkv_slices == "fused"
    main(["export", "--adapter", str(second / "adapter"), "--output", "again.onnx"])
    assert Path("again.onnx").is_file()


def test_export_needs_exactly_one_source(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", "--output", "x.onnx"])
    assert "exactly one of --ckpt_path or --adapter" in capsys.readouterr().err


def test_print_targets_lists_what_the_preset_picks_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.backbone=levit_128s", "--model.r=4", "--print_targets"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "stages.2.blocks.3.attn.qkv.linear" in out and "8x[q16|k16|v32]" in out and "adapted modules" in out


@pytest.mark.parametrize("name", ["preprocess", "serve", "export", "data", "reports"])
def test_every_module_imports_on_its_own(name):
    """`from vision_lora.X import ...` as a program's first import (no import cycle through the data package)."""
    result = subprocess.run([sys.executable, "-c", f"import vision_lora.{name}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
