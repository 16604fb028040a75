"""`vision-lora tune`: bad input refused before any trial, the trial loop (with a stand-in for the fit process), and
with real fit processes (slow): pruning, best.yaml rerun by fit, two processes on one study, kill -9 then --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from conftest import make_image_folder  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from vision_lora.cli import main  # noqa: E402
from vision_lora.tune import SearchSpace, apply_options, tune  # noqa: E402
from vision_lora.tune import sweep as sweep_module  # noqa: E402
from vision_lora.tune.storage import make_pruner, open_storage, open_study  # noqa: E402
from vision_lora.tune.trial import PRUNED_ATTR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "model.lr": {"type": "float", "low": 1.0e-4, "high": 0.3, "log": True},
    "model.r": {"type": "int", "low": 2, "high": 8, "step": 2},
    "data.augment": {"type": "categorical", "choices": ["none", "light"]},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A fit config of 2 short epochs of test_resnet on a 3-class folder, and a search space over it."""
    root = tmp_path_factory.mktemp("tune")
    data = make_image_folder(root / "data", {"train": 12, "val": 6})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 2,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "vision_lora.runs.RunLogger", "init_args": {"save_dir": str(root / "runs")}},
        },
        "model": {"backbone": "test_resnet", "weights": "random", "r": 4, "lr": 0.01, "input_size": 32},
        "data": {"root": str(data), "batch_size": 6, "num_workers": 0, "augment": "none", "hflip": 0.0},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return {"root": root, "config": root / "fit.yaml", "space": root / "space.yaml"}


def _space(tmp_path: Path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def _error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["tune", *args])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    return lines[0]


# -- bad input, refused before any trial ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "float", "low": 1.0, "high": 0.1}, "low (1.0) is greater than high (0.1)"),
        ({"type": "categorical", "choices": []}, "choices must be a non-empty list"),
        ({"type": "uniform", "low": 0, "high": 1}, "type must be one of float, int, categorical"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "a log range needs low > 0"),
        ({"type": "int", "low": 1, "high": 4.5}, "high must be an integer"),
        ({"type": "float", "low": 0.1}, "high must be a number"),
        ({"low": 0.1, "high": 1.0}, "type must be one of"),
    ],
)
def test_bad_parameter_is_one_line_before_any_trial(tmp_path, capsys, tiny, spec, message):
    line = _error(
        capsys,
        [
            "--config",
            str(tiny["config"]),
            "--search",
            _space(tmp_path, {"model.lr": spec}),
            "--n_trials",
            "2",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert message in line and line.startswith("vision-lora: error: search space: model.lr")
    assert not (tmp_path / "out").exists()


def test_unknown_option_and_unreachable_storage_are_refused(tmp_path, capsys, tiny):
    out = tmp_path / "out"
    common = ["--config", str(tiny["config"]), "--n_trials", "2", "--output", str(out)]
    line = _error(capsys, [*common, "--search", _space(tmp_path, {"model.learning_rate": SPACE["model.lr"]})])
    assert "fit has no option model.learning_rate; did you mean" in line
    line = _error(capsys, [*common, "--search", str(tiny["space"]), "--storage", "sqlite:////no/such/dir/study.db"])
    assert "cannot open --storage sqlite:////no/such/dir/study.db" in line
    assert not list(out.glob("trial_*"))
    line = _error(capsys, ["--search", str(tiny["space"]), "--n_trials", "2"])
    assert "needs --config" in line


def test_existing_study_needs_resume_and_the_same_space(tmp_path, capsys, tiny):
    out = tmp_path / "out"
    out.mkdir()
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    attrs = {"search_space": SearchSpace.from_dict(SPACE).as_dict(), "metric": "val_acc"}
    open_study(storage, "s", "maximize", resume=False, attrs=attrs)
    common = ["--config", str(tiny["config"]), "--n_trials", "2", "--output", str(out), "--study_name", "s"]
    line = _error(capsys, [*common, "--search", str(tiny["space"])])
    assert "already exists" in line and "--resume" in line
    other = _space(tmp_path, {**SPACE, "model.r": {"type": "int", "low": 2, "high": 16}})
    line = _error(capsys, [*common, "--search", other, "--resume", "true"])
    assert "was made with another search space" in line
    line = _error(capsys, [*common, "--search", str(tiny["space"]), "--resume", "true", "--metric", "val_loss"])
    assert "was made with another metric" in line
    assert not list(out.glob("trial_*"))


def test_apply_options_sets_dotted_options_and_class_init_args():
    config = {"model": {"lr": 0.1}, "trainer": {"logger": {"class_path": "X", "init_args": {"name": "a"}}}}
    out = apply_options(config, {"model.lr": 0.5, "trainer.logger.name": "b", "data.augment": "none"})
    assert out == {
        "model": {"lr": 0.5},
        "trainer": {"logger": {"class_path": "X", "init_args": {"name": "b"}}},
        "data": {"augment": "none"},
    }
    assert config["model"]["lr"] == 0.1  # a copy


# -- the trial loop, with a stand-in for the fit process --------------------------------------------------------


def _fake_fit(args: list[str], log: Path, poll: float = 0.5) -> int:
    """What a trial's fit process does, without training: trial 1 fails with fit's one-line error, the others report
    values that fall with the trial number, so successive halving prunes some."""
    config = yaml.safe_load(Path(args[1]).read_text())
    reporter = config["trainer"]["callbacks"][-1]["init_args"]
    study = optuna.load_study(study_name=reporter["study_name"], storage=reporter["storage"], pruner=make_pruner())
    trial = optuna.trial.Trial(study, reporter["trial_id"])
    if trial.number == 1:
        log.write_text("Traceback ...\nvision-lora: error: the loss is NaN at step 3: lower model.lr\n")
        return 1
    for step in (1, 2, 3):
        trial.report(1.0 - 0.1 * trial.number + 0.01 * step, step)
        if trial.should_prune():
            trial.set_user_attr(PRUNED_ATTR, step)
            break
    return 0


def test_trial_loop_records_fail_pruned_complete_and_writes_best(tmp_path, monkeypatch, tiny):
    import matplotlib

    monkeypatch.setattr(sweep_module, "run_fit", _fake_fit)
    rc_before = dict(matplotlib.rcParams)
    out = tmp_path / "out"
    tune(config=str(tiny["config"]), search=str(tiny["space"]), n_trials=5, output=str(out), heartbeat=2)
    study = optuna.load_study(study_name="vision-lora", storage=f"sqlite:///{out / 'study.db'}")
    states = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert len(states[TrialState.COMPLETE]) + len(states[TrialState.PRUNED]) == 5
    assert states[TrialState.PRUNED] and not states[TrialState.RUNNING]
    (failed,) = states[TrialState.FAIL]
    assert failed.number == 1 and failed.user_attrs["fail_reason"].startswith("exit status 1: vision-lora: error:")
    assert sorted(p.name for p in out.glob("trial_*")) == [f"trial_{t.number}" for t in study.trials]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["lr"] == study.best_trial.params["model.lr"] and study.best_trial.number == 0
    assert best["trainer"]["logger"]["init_args"]["save_dir"] == str(tiny["root"] / "runs")  # the user's, not a trial's
    assert (out / "trials.png").stat().st_size > 0
    assert dict(matplotlib.rcParams) == rc_before  # the picture leaves the project's plot style alone
    # Resuming a finished study runs nothing more; a larger --n_trials runs the difference.
    tune(config=str(tiny["config"]), search=str(tiny["space"]), n_trials=6, output=str(out), resume=True, heartbeat=2)
    study = optuna.load_study(study_name="vision-lora", storage=f"sqlite:///{out / 'study.db'}")
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 6


# -- real fit processes ----------------------------------------------------------------------------------------


def _tune_cmd(tiny, out: Path, n_trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vision_lora.cli",
        "tune",
        "--config",
        str(tiny["config"]),
        "--search",
        str(tiny["space"]),
        "--n_trials",
        str(n_trials),
        "--output",
        str(out),
        "--heartbeat",
        "2",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _states(out: Path) -> dict[str, int]:
    study = optuna.load_study(study_name="vision-lora", storage=f"sqlite:///{out / 'study.db'}")
    return {s.name: sum(t.state == s for t in study.trials) for s in TrialState}


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
def test_eight_trials_prune_and_best_yaml_reruns_with_fit(tmp_path, tiny):
    out = tmp_path / "out"
    start = time.monotonic()
    # val_loss: a continuous metric, so that successive halving has no ties to keep every trial on
    cmd = _tune_cmd(tiny, out, 8, "--metric", "val_loss", "--direction", "minimize")
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    print(f"8 trials: {time.monotonic() - start:.0f} s; {_states(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    states = _states(out)
    assert states["COMPLETE"] + states["PRUNED"] == 8 and states["PRUNED"] >= 1 and states["RUNNING"] == 0
    assert "best trial" in done.stdout and (out / "trials.png").is_file()
    fit = subprocess.run(
        [sys.executable, "-m", "vision_lora.cli", "fit", "--config", str(out / "best.yaml")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_share_the_study_budget(tmp_path, tiny):
    out = tmp_path / "out"
    start = time.monotonic()
    processes = []
    try:
        for _ in range(2):  # both at once, both creating-or-resuming the fresh study
            cmd = _tune_cmd(tiny, out, 4, "--resume", "true")
            processes.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [p.communicate(timeout=900)[0].decode() for p in processes]
    finally:
        _stop(processes)
    print(f"two processes: {time.monotonic() - start:.0f} s; {_states(out)}")
    assert [p.returncode for p in processes] == [0, 0], outputs
    states = _states(out)
    assert states["COMPLETE"] + states["PRUNED"] == 4 and states["RUNNING"] == 0
    ran = [line for text in outputs for line in text.splitlines() if ": COMPLETE " in line or ": PRUNED " in line]
    assert len(ran) == 4 and all(ran.count(line) == 1 for line in ran)
    logs = [p / "fit.log" for p in out.glob("trial_*")]
    assert all(log.read_text().count("Seed set to") == 1 for log in logs)  # no trial folder ran twice


@pytest.mark.slow
def test_kill_minus_9_mid_trial_then_resume(tmp_path, tiny):
    out = tmp_path / "out"
    start = time.monotonic()
    process = subprocess.Popen(_tune_cmd(tiny, out, 2), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("trial_0/fit/metrics.csv")):  # trial 0 is training
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        child = int(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        for _ in range(60):  # the fit process dies with the tune process that started it
            if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.5)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the trial's fit process outlived its tune process")
        assert _states(out)["RUNNING"] == 1
        resumed = subprocess.run(
            _tune_cmd(tiny, out, 2, "--resume", "true"), env=_env(), capture_output=True, text=True, timeout=900
        )
    finally:
        _stop([process])
    states = _states(out)
    print(f"kill -9 + resume: {time.monotonic() - start:.0f} s; {states}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert states["FAIL"] == 1 and states["COMPLETE"] + states["PRUNED"] == 2 and states["RUNNING"] == 0
    study = optuna.load_study(study_name="vision-lora", storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[0].state == TrialState.FAIL  # the killed one, failed for its stopped heartbeat
