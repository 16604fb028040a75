"""Preemption, for real: SIGTERM to a running `fit` (the main process, or the whole process group with its loader
workers), SLURM's SIGUSR1 with a stand-in `scontrol`, and a 2-process DDP run. Each must end with a resumable
last.ckpt, a non-zero exit status and a line saying how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_command, cli_env, run_named, slow_fit_args
from safetensors.torch import load_file


def _args(image_folder, backbone_file, *extra: str) -> list[str]:
    return slow_fit_args(image_folder, backbone_file("test_resnet"), *extra)


def _start(cwd: Path, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
    command = cli_command(*args, f"--trainer.logger.init_args.name={name}")
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    """Until `path` exists (the end of the first epoch), then a little longer: into the second epoch's steps."""
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the run never wrote its first checkpoint"
    time.sleep(0.7)


def _stop(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str, float]:
    """Wait for the signalled run: (exit status, output, seconds it took); the whole group is killed in any case."""
    start = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output, time.monotonic() - start
    finally:
        _kill_group(process.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_is_gone(pgid: int, seconds: float = 10) -> bool:
    """No process of the group is left (loader workers, DDP ranks) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _adapter(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "runs" / name / "version_0" / "adapter" / "adapter.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "main"])
def test_sigterm_saves_last_exits_nonzero_and_resume_matches_an_uninterrupted_run(
    image_folder, backbone_file, tmp_path, target
):
    args = _args(image_folder, backbone_file)
    straight = _start(tmp_path, args, "straight")
    victim = _start(tmp_path, args, "stopped")
    try:
        last = tmp_path / "runs" / "stopped" / "version_0" / "checkpoints" / "last.ckpt"
        _wait_for(last, victim)
        if target == "group":  # as preemption does: the run and its DataLoader workers
            os.killpg(victim.pid, signal.SIGTERM)
        else:
            os.kill(victim.pid, signal.SIGTERM)
        status, output, seconds = _stop(victim)
        assert _group_is_gone(victim.pid), "processes of the stopped run are left behind"
        assert straight.wait(timeout=300) == 0, straight.communicate()[0][-2000:]
    finally:
        _kill_group(straight.pid)
        _kill_group(victim.pid)

    assert status == 128 + signal.SIGTERM, output[-3000:]
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    line = next(x for x in output.splitlines() if x.startswith("vision-lora: SIGTERM received"))
    assert f"saved {Path('runs/stopped/version_0/checkpoints/last.ckpt')}" in line
    assert "Resume with the same command plus --ckpt_path last --trainer.logger.init_args.version=0" in line
    saved = torch.load(last, weights_only=True)
    assert 5 < saved["global_step"] < 15, "the checkpoint should be the one written on SIGTERM, mid-run"
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())

    resumed = run_named(tmp_path, args, "stopped", "--ckpt_path=last", "--trainer.logger.init_args.version=0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight_adapter, resumed_adapter = _adapter(tmp_path, "straight"), _adapter(tmp_path, "stopped")
    assert straight_adapter.keys() == resumed_adapter.keys()
    for key, value in straight_adapter.items():
        assert torch.equal(resumed_adapter[key], value), key  # bit for bit


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_last_requeues_and_the_requeued_run_resumes(image_folder, backbone_file, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's: records how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "lora-sweep",
        "SLURM_NODELIST": "127.0.0.1",
    }
    env = {**cli_env(), **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = _args(image_folder, backbone_file)
    run = _start(tmp_path, args, "slurm", env)
    try:
        last = tmp_path / "runs" / "slurm" / "version_0" / "checkpoints" / "last.ckpt"
        _wait_for(last, run)
        run.send_signal(signal.SIGUSR1)  # what `sbatch --signal=USR1@90` sends before the time limit
        status, output, seconds = _stop(run)
    finally:
        _kill_group(run.pid)
    assert status == 128 + signal.SIGUSR1, output[-3000:]
    assert seconds < 30
    assert "vision-lora: SIGUSR1 received: stopped after step" in output
    assert "requeued SLURM job 4242" in output
    assert log.read_text().split() == ["requeue", "4242"]
    assert 5 < torch.load(last, weights_only=True)["global_step"] < 15
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # nothing another run under runs/ could pick up

    command = cli_command(*args, "--trainer.logger.init_args.name=slurm", "--ckpt_path=last")
    requeued = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 15


@pytest.mark.slow
def test_sigterm_stops_both_ddp_ranks_with_one_checkpoint_and_no_orphans(image_folder, backbone_file, tmp_path):
    args = _args(image_folder, backbone_file, "--trainer.devices=2", "--trainer.strategy=ddp", "--data.num_workers=1")
    run = _start(tmp_path, args, "ddp")
    try:
        checkpoints = tmp_path / "runs" / "ddp" / "version_0" / "checkpoints"
        _wait_for(checkpoints / "last.ckpt", run)
        os.killpg(run.pid, signal.SIGTERM)  # both ranks and their loader workers
        status, output, seconds = _stop(run, timeout=90)  # Lightning's own DDP path hangs here on gloo
        assert _group_is_gone(run.pid), "processes of the stopped run are left behind"
    finally:
        _kill_group(run.pid)
    assert status == 128 + signal.SIGTERM, output[-3000:]
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    assert output.count("vision-lora: SIGTERM received: stopped after step") == 1  # rank 0 speaks for both
    assert sorted(p.name for p in checkpoints.iterdir())[1:] == ["last.ckpt"]  # best-*.ckpt, last.ckpt: no strays
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert saved["global_step"] > 3  # written on SIGTERM, after the first epoch's three steps per rank


@pytest.mark.slow
def test_sigterm_after_weights_went_nan_keeps_the_previous_last_checkpoint(image_folder, backbone_file, tmp_path):
    args = [*_args(image_folder, backbone_file), "--trainer.callbacks+=helpers.NanThenSigterm"]
    result = run_named(tmp_path, args, "nan")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    line = next(x for x in result.stderr.splitlines() if x.startswith("vision-lora: SIGTERM received"))
    assert "was not updated" in line and "holds NaN or infinite values" in line
    saved = torch.load(tmp_path / "runs" / "nan" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5  # the end of the first epoch, the last good weights
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


_WORKERS_LEFT_AT_EXIT = """
from torch.utils.data import DataLoader
from vision_lora.preemption import leave_sigterm_to_main
loader = DataLoader(list(range(10)), num_workers=2, persistent_workers=True, worker_init_fn=leave_sigterm_to_main)
iterator = iter(loader)
next(iterator)
"""


def test_loader_workers_still_end_when_the_main_process_exits():
    """Workers ignore a SIGTERM to the process group, not the one multiprocessing sends them at interpreter exit."""
    command = [sys.executable, "-c", _WORKERS_LEFT_AT_EXIT]
    process = subprocess.Popen(command, env=cli_env(), start_new_session=True)
    try:
        assert process.wait(timeout=120) == 0
        assert _group_is_gone(process.pid)
    finally:
        _kill_group(process.pid)
