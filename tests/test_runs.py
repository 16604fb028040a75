"""Runs side by side: version folders claimed atomically, `--ckpt_path last` of one's own run, metrics.csv kept."""

from __future__ import annotations

import csv
import multiprocessing
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, cli_command, cli_env

from vision_lora.cli import main
from vision_lora.runs import RunLogger


def _claim(root: str, barrier, queue) -> None:
    barrier.wait(timeout=60)  # all claim at the same moment
    queue.put(RunLogger(save_dir=root, name="sweep").version)


def test_runs_started_together_claim_different_version_folders(tmp_path):
    context = multiprocessing.get_context("fork")
    queue, barrier = context.Queue(), context.Barrier(8)
    claims = [context.Process(target=_claim, args=(str(tmp_path), barrier, queue)) for _ in range(8)]
    for process in claims:
        process.start()
    try:
        versions = sorted(queue.get(timeout=60) for _ in claims)
    finally:
        for process in claims:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert versions == list(range(8))
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [f"version_{v}" for v in range(8)]


def test_a_reused_version_folder_keeps_its_metrics(tmp_path):
    first = RunLogger(save_dir=str(tmp_path), version=0)
    first.log_metrics({"loss": 1.0}, step=0)
    first.save()
    second = RunLogger(save_dir=str(tmp_path), version=0)
    second.log_metrics({"loss": 0.5, "acc": 0.9}, step=1)  # a new column too
    second.save()
    with open(Path(second.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", "0.9")]


def test_ckpt_path_last_resumes_its_own_run_and_keeps_its_metrics(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *FAST, f"--data.root={image_folder}", "--trainer.max_epochs=1"]
    main(args)  # version_0
    main(args)  # version_1, written later: the newest last.ckpt
    runs = tmp_path / "runs" / "lightning_logs"
    other = (runs / "version_1" / "checkpoints" / "last.ckpt").read_bytes()
    metrics = (runs / "version_0" / "metrics.csv").read_text().splitlines()

    with pytest.raises(SystemExit) as stop:
        main([*args, "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "several runs under" in err and "version_0, version_1" in err and "init_args.version=N" in err

    main([*args, "--ckpt_path=last", "--trainer.max_epochs=2", "--trainer.logger.init_args.version=0"])
    assert torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert (runs / "version_1" / "checkpoints" / "last.ckpt").read_bytes() == other
    assert not (runs / "version_2").exists()
    resumed = (runs / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(resumed) > len(metrics)  # the first epoch's rows are still there, the second epoch's appended
    with open(runs / "version_0" / "metrics.csv", newline="") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("epoch")}
    assert epochs == {"0", "1"}


@pytest.mark.slow
def test_four_runs_started_at_once_each_get_their_own_version(image_folder, backbone_file, tmp_path):
    rates = ["0.01", "0.02", "0.03", "0.04"]
    processes = []
    try:
        for lr in rates:
            command = cli_command(
                "fit",
                *FAST,
                f"--data.root={image_folder}",
                f"--model.weights={backbone_file('test_resnet')}",
                f"--model.lr={lr}",
                "--trainer.max_epochs=2",
            )
            out = subprocess.PIPE
            processes.append(subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=out, stderr=out, text=True))
        for process in processes:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-2000:]
    finally:
        for process in processes:
            process.kill()
    runs = tmp_path / "runs" / "lightning_logs"
    assert sorted(p.name for p in runs.iterdir()) == [f"version_{v}" for v in range(4)]
    seen = []
    for run in sorted(runs.iterdir()):
        lr = str(yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"])
        for ckpt in (run / "checkpoints").glob("*.ckpt"):  # every checkpoint of the folder is its own run's
            assert str(torch.load(ckpt, weights_only=True)["hyper_parameters"]["lr"]) == lr, ckpt
        with open(run / "metrics.csv", newline="") as f:
            steps = [row["step"] for row in csv.DictReader(f) if row.get("train_loss_step")]
        assert len(steps) == len(set(steps)) == 10, run  # two epochs of 5 steps, logged once: no other run's rows
        assert (run / "adapter" / "adapter.safetensors").is_file()
        seen.append(lr)
    assert sorted(seen) == rates
