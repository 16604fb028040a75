"""`vision-lora tune`: an Optuna sweep over the options of `vision-lora fit`, one fit process per trial.

Every process pointed at a study shares its trial budget: a process asks for a trial only while the study holds
fewer than `n_trials` COMPLETE + PRUNED + RUNNING trials, so two processes started with `--n_trials 8` finish 8 trials
between them. A trial whose process died (kill -9, a lost machine) stops sending heartbeats, is failed by the next
process that looks, and is replaced."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .._io import atomic_write
from ..errors import VisionLoRAError
from .plot import plot_trials
from .space import SearchSpace, apply_options, fit_options, load_yaml
from .storage import open_storage, open_study, retry
from .trial import PRUNED_ATTR, fail_reason, run_fit

__all__ = ["Sweep", "run_tune_command", "tune"]

MAX_FAILURES_IN_A_ROW = 5  # a process stops when this many of its trials in a row failed: the space or config is bad
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def _say(message: str) -> None:
    print(f"tune: {message}", file=sys.stderr, flush=True)


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


class Sweep:
    """The trials of one process of a sweep: asks for trials while the study needs them and runs each as a fit.

    Args:
        study: the study (its storage with heartbeats).
        space: the search space.
        config: the fit config (a mapping) each trial applies its options to.
        output: the folder of the trial folders `trial_<number>/`.
        storage_url: the study's storage, for the trial processes.
        metric: the reported metric.
        n_trials: COMPLETE + PRUNED trials the study ends with.
        fit_args: more arguments of each trial's fit (`--recipe off`).
        poll: seconds between looks at the study while others run its last trials.
    """

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        config: dict[str, Any],
        output: Path,
        storage_url: str,
        metric: str,
        n_trials: int,
        fit_args: list[str],
        poll: float = 2.0,
    ) -> None:
        self.study, self.space, self.config, self.output = study, space, config, output
        self.storage_url, self.metric, self.n_trials, self.fit_args, self.poll = (
            storage_url,
            metric,
            n_trials,
            fit_args,
            poll,
        )
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    def tally(self, below: int | None = None) -> tuple[int, int]:
        """(COMPLETE + PRUNED, RUNNING) trials of the study, after failing those whose heartbeat stopped; `below`:
        count only the RUNNING ones numbered lower."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry(lambda: optuna.storages.fail_stale_trials(self.study))
        trials = retry(lambda: self.study.get_trials(deepcopy=False))
        done = sum(t.state in _DONE for t in trials)
        running = sum(t.state == TrialState.RUNNING and (below is None or t.number < below) for t in trials)
        return done, running

    def run(self, timeout: float | None = None) -> None:
        """Run trials until the study holds `n_trials` COMPLETE + PRUNED ones, waiting for other processes' last
        trials; with `timeout`, start no trial after that many seconds.

        Raises:
            VisionLoRAError: `MAX_FAILURES_IN_A_ROW` trials of this process failed in a row.
        """
        start, failed_in_a_row, waiting = time.monotonic(), 0, False
        while True:
            done, running = self.tally()
            if done >= self.n_trials:
                return
            if timeout is not None and time.monotonic() - start >= timeout:
                _say(f"--timeout {timeout:g} s reached: {done} of {self.n_trials} trials done, starting no more.")
                return
            if done + running >= self.n_trials:  # the study's last trials are running elsewhere
                if not waiting:
                    _say(f"waiting for {running} running trial(s) of the study ({done}/{self.n_trials} done).")
                waiting = True
                time.sleep(self.poll)
                continue
            waiting = False
            finished: list[FrozenTrial] = []
            retry(
                lambda finished=finished: self.study.optimize(self.objective, n_trials=1, callbacks=[_keep(finished)])
            )
            if not finished or finished[-1].user_attrs.get("surplus"):
                continue
            failed_in_a_row = failed_in_a_row + 1 if finished[-1].state == TrialState.FAIL else 0
            if failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise VisionLoRAError(
                    f"{failed_in_a_row} trials in a row failed, the last (trial {finished[-1].number}): "
                    f"{finished[-1].user_attrs.get('fail_reason')}"
                )

    def _fail(self, trial: optuna.Trial, reason: str, **attrs: Any) -> float:
        for key, value in {"fail_reason": reason, **attrs}.items():
            retry(lambda key=key, value=value: trial.set_user_attr(key, value))
        _say(f"trial {trial.number}: FAIL ({reason})")
        return math.nan  # Optuna records a NaN value as FAIL

    def objective(self, trial: optuna.Trial) -> float:
        """Run one trial as a fit process; its best reported metric, or NaN (FAIL), or `optuna.TrialPruned`."""
        # Two processes may ask for the study's last trial at once: the higher number waits and is not run.
        while True:
            done, lower = self.tally(below=trial.number)
            if done + lower < self.n_trials:
                break
            if done >= self.n_trials:
                return self._fail(trial, f"not needed: the study reached {self.n_trials} trials", surplus=True)
            time.sleep(self.poll)
        options = {p.name: p.suggest(trial) for p in self.space.params}
        folder = self.output / f"trial_{trial.number}"
        try:
            folder.mkdir()  # exclusive: a trial folder is never written twice
        except FileExistsError:
            return self._fail(trial, f"{folder} already exists")
        retry(lambda: trial.set_user_attr("folder", str(folder)))
        _say(f"trial {trial.number}: {_options_text(options)}")
        start = time.monotonic()
        config_path = folder / "trial.yaml"
        config_path.write_text(yaml.safe_dump(self.trial_config(trial, options, folder), sort_keys=False))
        code = run_fit(["--config", str(config_path), *self.fit_args], folder / "fit.log")
        took = f"{time.monotonic() - start:.0f} s"
        if code != 0:
            return self._fail(trial, fail_reason(folder / "fit.log", code))
        frozen = next(t for t in retry(lambda: self.study.get_trials(deepcopy=False)) if t.number == trial.number)
        values = [v for _, v in sorted(frozen.intermediate_values.items()) if math.isfinite(v)]
        if frozen.user_attrs.get(PRUNED_ATTR):
            _say(
                f"trial {trial.number}: PRUNED after {len(values)} validation(s), "
                f"{self.metric}={values[-1]:.4f}, {took}"
            )
            raise optuna.TrialPruned(f"pruned after validation {frozen.user_attrs[PRUNED_ATTR]}")
        if not values:
            return self._fail(trial, f"the run reported no finite {self.metric} (see {folder}/fit.log)")
        value = max(values) if self.maximize else min(values)
        _say(f"trial {trial.number}: COMPLETE {self.metric}={value:.4f}, {took}")
        return value

    def trial_config(self, trial: optuna.Trial, options: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The fit config of `trial`: the options applied, its run logged into `folder`, the reporting callback."""
        config = apply_options(self.config, {**self.space.fixed, **options})
        logger = {
            "class_path": "vision_lora.runs.RunLogger",
            "init_args": {"save_dir": str(folder), "name": "", "version": "fit"},
        }
        reporter = {
            "class_path": "vision_lora.tune.trial.TrialReporter",
            "init_args": {
                "storage": self.storage_url,
                "study_name": self.study.study_name,
                "trial_id": trial._trial_id,  # what `optuna.trial.Trial(study, trial_id)` takes
                "monitor": self.metric,
                "parent_pid": os.getpid(),
            },
        }
        trainer = config.setdefault("trainer", {})
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), reporter]
        trainer["logger"] = logger
        trainer["default_root_dir"] = str(folder)
        return config


def _keep(finished: list[FrozenTrial]):
    return lambda study, trial: finished.append(trial)


def _check_output(output: Path) -> None:
    taken = sorted(p.name for p in output.glob("trial_*") if p.is_dir())
    if taken:
        raise VisionLoRAError(
            f"{output} already holds trial folders ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}) of "
            "another study: pass --resume to continue that study, or another --output."
        )


def _write_best(study: optuna.Study, sweep: Sweep, output: Path, metric: str, fit_args: list[str]) -> Path:
    best = study.best_trial
    options = {**sweep.space.fixed, **best.params}
    if fit_args:  # the trials ran with --recipe off: so does the rerun
        options[fit_args[0].lstrip("-")] = fit_args[1]
    header = f"# vision-lora tune: study {study.study_name!r}, trial {best.number}, {metric}={best.value:.6g}\n"
    text = header + yaml.safe_dump(apply_options(sweep.config, options), sort_keys=False)
    path = output / "best.yaml"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(f"best trial {best.number}: {metric}={best.value:.6g}")
    for key, value in best.params.items():
        print(f"  {key}: {value}")
    return path


def tune(
    config: str | None = None,
    search: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    metric: str = "val_acc",
    direction: Literal["maximize", "minimize"] = "maximize",
    storage: str | None = None,
    study_name: str = "vision-lora",
    resume: bool = False,
    output: str = "tune",
    heartbeat: int = 30,
) -> None:
    """Search the options of `vision-lora fit` with Optuna, one fit process per trial, pruned by successive halving.

    Each trial reports its metric after every validation pass and is pruned when it falls behind. At the end the
    best options are printed and written as `<output>/best.yaml`, which `vision-lora fit --config` reruns, and the
    trials are drawn in `<output>/trials.png`.

    Run several processes on one study (same --storage and --study_name, with --resume) to share its trials. Needs
    the [tune] extra. See docs/tuning.md.

    Args:
        config: the fit config the trials start from; required.
        search: the search space, a YAML file of dotted fit options, e.g.
            `model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}`,
            `model.r: {type: int, low: 4, high: 32, step: 4}`,
            `data.augment: {type: categorical, choices: [none, light, standard]}`; any other value is fixed for
            every trial; required.
        n_trials: COMPLETE + PRUNED trials of the whole study (all its processes together); required.
        timeout: start no trial after this many seconds (the running one finishes).
        metric: the metric a trial reports after each validation pass and is ranked by (its best pass counts).
        direction: "maximize" or "minimize" the metric.
        storage: an Optuna storage URL (sqlite:///FILE on one machine; a database server such as
            postgresql://USER:PASSWORD@HOST/DB for several); default `sqlite:///<output>/study.db`.
        study_name: the study in the storage.
        resume: continue the study when it exists (without it, an existing study is an error).
        output: the folder of the trial runs (`trial_<number>/`), best.yaml and trials.png.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for twice as long (its process was
            killed) is recorded FAIL and replaced.

    Raises:
        VisionLoRAError: bad options, config or search space; a storage that cannot be opened; a study that exists
            (without --resume) or holds another search space, metric or direction.
    """
    for name, value in (("--config", config), ("--search", search), ("--n_trials", n_trials)):
        if value is None:
            raise VisionLoRAError(f"vision-lora tune needs {name}; see vision-lora tune --help.")
    if n_trials < 1 or heartbeat < 1 or (timeout is not None and timeout <= 0):
        raise VisionLoRAError("--n_trials and --heartbeat must be at least 1, --timeout positive.")
    space = SearchSpace.load(search)
    base = load_yaml(config, "config")
    options = fit_options(config)
    space.check_names(options)
    fit_args = ["--recipe", "off"] if "recipe" in options else []
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').absolute()}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command says what happens, one line per trial
    try:
        store = open_storage(url, heartbeat)
        if not resume:
            _check_output(out)
        attrs = {"search_space": space.as_dict(), "metric": metric}
        study, created = open_study(store, study_name, direction, resume, attrs)
        _say(f"{'created' if created else 'resuming'} study {study_name!r} in {url}")
        sweep = Sweep(study, space, base, out, url, metric, n_trials, fit_args)
        sweep.run(timeout)
        trials = retry(lambda: study.get_trials(deepcopy=False))
        counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
        _say(f"study {study_name!r}: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
        plot = plot_trials(trials, metric, sweep.maximize, out / "trials.png")
        _say(f"wrote {plot}")
        if not counts.get("COMPLETE"):
            raise VisionLoRAError(f"no trial of the study {study_name!r} completed: nothing to write to best.yaml.")
        _say(f"wrote {_write_best(study, sweep, out, metric, fit_args)}")
    finally:
        optuna.logging.set_verbosity(verbosity)


def run_tune_command(args: list[str] | None) -> None:
    """Run `vision-lora tune ARGS` (`args` with the command first; None: `sys.argv[1:]`).

    Parsed here rather than by jsonargparse's CLI, which drops a function's own `config` option.
    """
    from jsonargparse import ArgumentParser

    argv = list(sys.argv[1:] if args is None else args)
    for i, arg in enumerate(argv):  # `--resume` alone is a flag; `--resume true|false` works too
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv[i] = "--resume=true"
    parser = ArgumentParser(prog="vision-lora tune", description=(tune.__doc__ or "").split("\n\n")[0])
    parser.add_function_arguments(tune, as_group=False)
    tune(**parser.parse_args(argv[1:]).as_dict())
