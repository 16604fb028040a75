"""One trial of `vision-lora tune`: a `vision-lora fit` process of its own (a crash or a leak ends only that trial),
and the callback inside it that reports each validation to the study and stops the run when the pruner says so."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from ..errors import VisionLoRAError

__all__ = ["PRUNED_ATTR", "TrialReporter", "fail_reason", "run_fit"]

PRUNED_ATTR = "pruned_after"  # user attr the trial process sets: the validation pass at which it was pruned
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when the tune process that started it dies (even by kill -9), so no trial
    trains on unseen. Elsewhere the trial ends at its next validation (see `TrialReporter`)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the line above
        raise VisionLoRAError(f"the vision-lora tune process ({parent_pid}) that started this trial is gone.")


class TrialReporter(L.Callback):
    """Reports the monitored metric of each validation of `fit` (step 1, 2, ...) to an Optuna trial and stops the run
    when the study's pruner prunes it; the tune process that started the run then records the trial PRUNED.

    Args:
        storage: the study's storage URL.
        study_name: the study.
        trial_id: the trial's storage id.
        monitor: the metric reported.
        parent_pid: the tune process; the run ends when it is gone.
    """

    def __init__(
        self, storage: str, study_name: str, trial_id: int, monitor: str = "val_acc", parent_pid: int | None = None
    ) -> None:
        super().__init__()
        self.storage, self.study_name, self.trial_id, self.monitor = storage, study_name, trial_id, monitor
        self.parent_pid = parent_pid
        self._trial = None
        self._step = 0
        if parent_pid is not None and os.environ.get("LOCAL_RANK", "0") == "0":  # other DDP ranks: rank 0 is theirs
            _die_with_parent(parent_pid)

    def _open(self):
        import optuna

        from .storage import make_pruner, open_storage, retry

        if self._trial is None:
            study = retry(
                lambda: optuna.load_study(
                    study_name=self.study_name, storage=open_storage(self.storage), pruner=make_pruner()
                )
            )
            self._trial = retry(lambda: optuna.trial.Trial(study, self.trial_id))
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the sanity check, and the extra validation pass fit makes after training
        from .storage import retry

        self._step += 1
        prune = False
        if trainer.is_global_zero:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise VisionLoRAError(f"the vision-lora tune process ({self.parent_pid}) of this trial is gone.")
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                trial = self._open()
                retry(lambda: trial.report(float(value), self._step))
                prune = retry(trial.should_prune)
                if prune:
                    retry(lambda: trial.set_user_attr(PRUNED_ATTR, self._step))
        prune = trainer.strategy.broadcast(prune)  # every rank stops together
        if prune:
            trainer.should_stop = True


def fail_reason(log: Path, returncode: int) -> str:
    """Why a trial's fit process failed: its one-line error, else the last line of its log, and how it ended."""
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    lines = (
        [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    )
    errors = [line for line in lines if line.startswith("vision-lora: error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"{how}: {last[:500]}"


def run_fit(args: list[str], log: Path, poll: float = 0.5) -> int:
    """Run `vision-lora fit ARGS` as a process of its own (its own session: Ctrl-C in a terminal reaches only the
    tune process, which ends it), output into `log`; its exit status (negative: the signal that killed it). The
    process and its dataloader workers are killed whatever ends the wait."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "vision_lora.cli", "fit", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            while process.poll() is None:
                time.sleep(poll)
            return process.returncode
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            else:
                try:  # workers the fit process left behind
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
