"""Faults a real run meets, each set up for real: killed processes, torn writes, planted pickles, failing ranks,
mismatched checkpoints, typos. Every test checks the outcome a user would want."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import FAST, cli_command, cli_env, run_named, slow_fit_args, start_named
from safetensors.torch import load_file

from vision_lora._io import atomic_write
from vision_lora.cli import main


def test_kill_9_during_training_then_resume_last_matches_uninterrupted_run(image_folder, backbone_file, tmp_path):
    args = slow_fit_args(image_folder, backbone_file("test_resnet"))

    straight = run_named(tmp_path, args, "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    victim = start_named(tmp_path, args, "killed")
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch's steps
    os.killpg(victim.pid, signal.SIGKILL)  # the run and its loader workers, as a crash takes them all
    assert victim.wait(timeout=30) == -signal.SIGKILL, "the run should have been killed mid-training"
    assert torch.load(last, weights_only=True)["epoch"] < 2

    resumed = run_named(tmp_path, args, "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stderr + resumed.stdout

    final = {}
    for name in ("straight", "killed"):
        ckpt = torch.load(tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["global_step"] == 15
        final[name] = ckpt["state_dict"]
    assert final["straight"].keys() == final["killed"].keys()
    for key, value in final["straight"].items():
        torch.testing.assert_close(final["killed"][key], value, rtol=1e-5, atol=1e-6)
    adapters = [
        load_file(str(tmp_path / "runs" / n / "version_0" / "adapter" / "adapter.safetensors"))
        for n in ("straight", "killed")
    ]
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=1e-5, atol=1e-6)


_TORN_WRITE = """
import os, signal, sys, torch
from vision_lora._io import atomic_write

def half_then_die(tmp):
    with open(tmp, "wb") as f:
        f.write(b"PK" + b"x" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], half_then_die)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.arange(5.0)}, "epoch": 3}, path)
    result = subprocess.run([sys.executable, "-c", _TORN_WRITE, str(path)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["epoch"] == 3
    torch.testing.assert_close(torch.load(path, weights_only=True)["state_dict"]["w"], torch.arange(5.0))


def test_atomic_write_error_leaves_no_partial_file(tmp_path):
    path = tmp_path / "adapter.safetensors"

    def fail(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert not path.exists() and not list(tmp_path.iterdir())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_planted_pickle_in_a_checkpoint_is_never_executed(image_folder, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "test_resnet"}, "payload": _Evil()}, evil)
    monkeypatch.chdir(tmp_path)
    for command in (
        ["test", *FAST, f"--data.root={image_folder}"],
        ["predict", f"--data.predict_dir={image_folder}"],
        ["export", "--output=x.onnx"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, f"--ckpt_path={evil}"])
        assert exit_info.value.code == 1
        assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_adapter_weights_are_never_unpickled(tmp_path, monkeypatch):
    from vision_lora import LoRAConfig, apply_lora, load_adapter, save_adapter

    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    model = timm.create_model("test_vit", num_classes=3)
    apply_lora(model, LoRAConfig())
    save_adapter(model, tmp_path / "adapter")
    torch.save({"x": _Evil()}, tmp_path / "adapter" / "adapter.safetensors")  # a pickle wearing the right name
    with pytest.raises(Exception, match="(?i)header|safetensor|deserializ"):
        load_adapter(timm.create_model("test_vit", num_classes=3), tmp_path / "adapter")
    assert not marker.exists()


def test_failing_rank_stops_a_ddp_run_quickly(image_folder, tmp_path):
    cmd = cli_command(
        "fit",
        *FAST,
        f"--data.root={image_folder}",
        "--trainer.max_epochs=20",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.callbacks+=helpers.FailOnRank1",
    )
    start = time.time()
    result = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert time.time() - start < 120
    assert "rank 1 failed on purpose" in result.stderr


def test_checkpoint_of_another_backbone_or_class_count_is_refused(
    image_folder, backbone_file, tmp_path, monkeypatch, capsys
):
    import lightning as L

    from vision_lora import ImageFolderDataModule, LoRAClassifier

    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            *FAST,
            f"--data.root={image_folder}",
            f"--model.weights={backbone_file('test_resnet')}",
            "--trainer.max_epochs=1",
        ]
    )
    ckpt = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    other = LoRAClassifier("test_efficientnet", num_classes=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data = ImageFolderDataModule(root=str(image_folder), num_workers=0)
    with pytest.raises(ValueError, match="trained on 'test_resnet'"):
        trainer.test(other, datamodule=data, ckpt_path=str(ckpt))

    with pytest.raises(SystemExit):  # Lightning would silently rebuild the checkpoint's backbone instead
        main(
            ["test", *FAST, "--model.backbone=test_efficientnet", f"--data.root={image_folder}", f"--ckpt_path={ckpt}"]
        )
    assert "trained on 'test_resnet' but model.backbone is 'test_efficientnet'" in capsys.readouterr().err

    two = tmp_path / "two"
    for split in ("train", "val", "test"):
        for name in ("green", "red square"):
            shutil.copytree(image_folder / split / name, two / split / name)
    with pytest.raises(SystemExit):
        main(["test", *FAST, f"--data.root={two}", f"--ckpt_path={ckpt}"])
    assert "has 3 classes but the model was built with 2" in capsys.readouterr().err


def test_typo_in_a_yaml_option_is_reported_not_swallowed(image_folder, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"backbone": "test_resnet", "lora_alpah": 32}, "data": {"root": str(image_folder)}})
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    assert "lora_alpah" in capsys.readouterr().err


def test_head_size_disagreeing_with_the_data_is_refused(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key, value in (("num_classes", 10), ("class_names", ["a", "b", "c"])):
        config = tmp_path / f"{key}.yaml"
        config.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet", key: value}}))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), *FAST, f"--data.root={image_folder}"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"model.{key}={value} disagrees with the data" in err and "blue ünïcode, green, red square" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_gradient_starved_lora_is_an_error_naming_the_parameters(image_folder, tmp_path, monkeypatch, capsys):
    """Reentrant activation checkpointing over a frozen input cuts the LoRA weights off from the loss."""
    from timm.layers import set_reentrant_ckpt

    monkeypatch.chdir(tmp_path)
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "fit",
                    *FAST,
                    f"--data.root={image_folder}",
                    "--model.grad_checkpointing=true",
                    "--trainer.max_epochs=1",
                ]
            )
    finally:
        set_reentrant_ckpt(False)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "received no gradient in the first step" in err and "lora_A" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.root=/does/not/exist"], "/does/not/exist does not exist"),
        (["--data.root={empty}"], "No images in"),
        (["--model.target_modules=[nothing.here]"], "matches no module"),
        (["--model.target_modules=[layer1.0]"], "container module"),
        (["--model.r=1000"], "rank r=1000 exceeds"),
        (["--model.backbone=resnet_does_not_exist"], "Unknown timm model"),
        (["--model.num_classes=10"], "model.num_classes comes from the data"),
    ],
)
def test_bad_inputs_end_in_one_line_errors(image_folder, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir(parents=True)
    (empty / "train" / "a" / "notes.txt").write_text("no images here")
    args = [a.format(empty=empty) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *FAST, f"--data.root={image_folder}", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vision-lora: error:") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"data"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_diverging_run_stops_with_a_message_and_writes_no_nan(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *FAST, f"--data.root={image_folder}", "--trainer.max_epochs=3"]
    main([*args, "--trainer.logger.init_args.name=good", "--trainer.max_epochs=1"])
    with pytest.raises(SystemExit) as stop:
        main([*args, "--model.lr=1e4", "--model.head_lr=1e4", "--model.warmup_fraction=0"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Training diverged at step" in err and "learning rates" in err and "Lower --model.lr" in err
    written = list((tmp_path / "runs").rglob("*.ckpt")) + list((tmp_path / "runs").rglob("*.safetensors"))
    assert written  # the good run's files, and whatever the diverging run wrote before it diverged
    for path in written:
        state = (
            load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["state_dict"]
        )
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_a_checkpoint_holding_nan_is_never_written_over_a_good_one(tmp_path):
    from vision_lora.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(ValueError, match="w holds NaN"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    torch.testing.assert_close(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
