"""Writes that fail for real: a file-size limit (RLIMIT_FSIZE, as a full disk stops a write part-way) on checkpoint
and adapter writes, and output folders that cannot be created."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest
import timm
import torch
from helpers import FAST, cli_command, cli_env, run_named
from safetensors.torch import load_file

from vision_lora import LoRAConfig, apply_lora, save_adapter
from vision_lora.cli import main


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past `limit` bytes fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


_SAVE_ADAPTER = """
import sys, timm, torch
from vision_lora import LoRAConfig, apply_lora, save_adapter
torch.manual_seed(1)
model = timm.create_model("test_vit", num_classes=3)
apply_lora(model, LoRAConfig(r=64))
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p)
save_adapter(model, sys.argv[1])
"""


def test_adapter_write_past_a_file_size_limit_fails_with_the_path_and_keeps_the_previous_adapter(tmp_path):
    model = timm.create_model("test_vit", num_classes=3)
    apply_lora(model, LoRAConfig(r=64))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    before = load_file(str(adapter / "adapter.safetensors"))
    size = (adapter / "adapter.safetensors").stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", _SAVE_ADAPTER, str(adapter)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(size // 2),
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"could not write {adapter / 'adapter.safetensors'}: File too large (EFBIG)" in last
    after = load_file(str(adapter / "adapter.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.slow
def test_checkpoint_write_past_a_file_size_limit_stops_the_run_and_keeps_the_previous_checkpoint(
    image_folder, backbone_file, tmp_path
):
    args = ["fit", *FAST, f"--data.root={image_folder}", f"--model.weights={backbone_file('test_resnet')}"]
    first = run_named(tmp_path, [*args, "--trainer.max_epochs=1"], "full")
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = tmp_path / "runs" / "full" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    limit = last.stat().st_size // 2
    command = cli_command(*args, "--trainer.max_epochs=2", "--trainer.logger.init_args.name=full", "--ckpt_path=last")
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(limit),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vision-lora: error: could not write ") and "File too large (EFBIG)" in line, line
    assert "could not write runs/full/version_0/checkpoints/" in line and "is unchanged" in line
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 5  # the first run's, intact and loadable
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "option", ["--checkpoint.dirpath={blocker}/checkpoints", "--trainer.logger.init_args.save_dir={blocker}/runs"]
)
def test_an_output_folder_that_cannot_be_written_fails_before_the_first_step(
    image_folder, tmp_path, monkeypatch, capsys, option
):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"  # root ignores permissions; a regular file where a folder should be stops it
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                *FAST,
                f"--data.root={image_folder}",
                "--trainer.max_epochs=1",
                option.format(blocker=blocker),
                "--trainer.callbacks+=helpers.FailOnFirstStep",
            ]
        )
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vision-lora: error:") and str(blocker) in err[-1] and "Not a directory" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
