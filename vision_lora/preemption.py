"""Preemption: SIGTERM (a spot instance going away, a scheduler, `kill`) or SLURM's requeue signal during `fit` stops
the run at the end of the current training step, writes a resumable `last.ckpt` and exits with status 128 + the signal
number and a line saying how to resume.

Lightning's own signal handling does most of it: its SIGTERM handler sets `trainer.received_sigterm`, its loops raise
`SIGTERMException` at the end of the step, and its `on_exception` hook is where the checkpoint is written. What is
changed, each because it was seen to fail:
- Lightning exits with status 0 (`SIGTERMException` is a `SystemExit` without a code): the exception gets the code.
- SIGTERM to the process group kills the DataLoader workers, and the main process then raises "DataLoader worker is
  killed by signal" from torch's SIGCHLD handler in the middle of a step (say, inside `backward`), where no consistent
  checkpoint can be written: workers ignore a SIGTERM that does not come from the main process
  (`leave_sigterm_to_main`) and exit when the main process shuts them down, or, should it die, when their watchdog
  sees it gone.
- Under DDP, Lightning's handler broadcasts from inside the signal handler, at whatever point each rank is: the ranks'
  collectives no longer match. Here a signal only marks the rank; the ranks agree at the end of every training step
  (one all-reduce of a flag) and stop together at the same step.
- Under SLURM with auto-requeue, Lightning's SIGUSR1 handler writes `hpc_ckpt_<n>.ckpt` from inside the handler (mid
  step) into `default_root_dir`, which every run under `runs/` shares, and restores the newest one of any run: here the
  run stops at the step's end like on SIGTERM, writes its own `last.ckpt`, then asks `scontrol requeue` for the job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import VisionLoRAError

__all__ = ["Preemption", "leave_sigterm_to_main"]


def leave_sigterm_to_main(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a SIGTERM from anyone but the main process (a signal to the whole process group)
    is ignored, so that the main process can finish its step and shut the worker down; a SIGTERM from the main process
    (its shutdown, or multiprocessing's at interpreter exit) ends the worker at once, as in torch's own handler.

    Python signal handlers cannot see the sender: SIGTERM is blocked and a thread takes it with `sigwaitinfo`.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="vision-lora-sigterm", daemon=True).start()


class Preemption(L.Callback):
    """On SIGTERM, or SLURM's requeue signal under SLURM with auto-requeue, during `fit`: stop at the end of the
    current training step, write `<checkpoint dir>/last.ckpt` (never one holding NaN: the checkpoint IO refuses it),
    print how to resume, and exit with status 128 + the signal number; under SLURM, requeue the job.

    Args:
        filename: name (without `.ckpt`) of the checkpoint written on preemption, beside the run's other checkpoints.
    """

    def __init__(self, filename: str = "last") -> None:
        self.filename = filename
        self.signum: int | None = None
        self.path: Path | None = None
        self._installed = False
        self._requeue = False

    # -- signals -------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.path, self._installed, self._requeue = None, None, False, False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def _install(self, trainer: L.Trainer) -> None:
        """After Lightning registered its handlers (just before the sanity check); its teardown restores the
        handlers of before the fit, ours included."""
        if self._installed or sys.platform == "win32":
            return
        self._installed = True
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.signum = self.signum or signum
            if trainer.world_size > 1:  # the ranks agree at the end of the step (on_train_batch_end)
                return
            if callable(lightning_sigterm):
                lightning_sigterm(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            requeue_signal = environment.requeue_signal or signal.SIGUSR1

            def on_requeue_signal(signum: int, frame: FrameType | None) -> None:
                self.signum, self._requeue = self.signum or signum, True
                if trainer.world_size == 1:
                    trainer._signal_connector.received_sigterm = True

            signal.signal(requeue_signal, on_requeue_signal)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        # Every rank reaches this point once per step: the flag of any signalled rank stops all of them here.
        flag = torch.tensor([self.signum or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            self.signum = int(flag.item())
            trainer._signal_connector.received_sigterm = True  # Lightning's loop raises SIGTERMException next

    # -- the checkpoint ------------------------------------------------------------------------------------------

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        signum = self.signum or signal.SIGTERM
        exception.code = 128 + signum  # Lightning's SIGTERMException would exit with status 0
        name = signal.Signals(signum).name
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None:
            self._say(
                trainer,
                f"{name} received: stopped at step {trainer.global_step}; checkpointing is off, so nothing was saved.",
            )
            return
        path = Path(folder) / f"{self.filename}.ckpt"
        try:
            trainer.save_checkpoint(path)
        except (ValueError, OSError) as err:  # ValueError: non-finite weights, which never overwrite a good file
            self._say(
                trainer,
                f"{name} received: stopped at step {trainer.global_step}, but {path} was not updated "
                f"({err}); it keeps the previous checkpoint.",
            )
        else:
            self.path = path
            version = getattr(trainer.logger, "version", None) if trainer.is_global_zero else None
            which = f" --trainer.logger.init_args.version={version}" if isinstance(version, int) else ""
            self._say(
                trainer,
                f"{name} received: stopped after step {trainer.global_step} (epoch {trainer.current_epoch}) and saved "
                f"{path}. Resume with the same command plus --ckpt_path last{which}",
            )
        if self._requeue and trainer.is_global_zero:
            requeue_slurm_job()

    @staticmethod
    def _say(trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(f"vision-lora: {line}", file=sys.stderr, flush=True)


def requeue_slurm_job() -> int:
    """`scontrol requeue` this SLURM job (array task included), as Lightning's SLURM handler does; its exit status."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise VisionLoRAError(f"Not a SLURM job id: {job_id!r}")
    status = subprocess.call(["scontrol", "requeue", job_id])
    print(
        f"vision-lora: requeued SLURM job {job_id}"
        if status == 0
        else f"vision-lora: scontrol requeue {job_id} failed with status {status}",
        file=sys.stderr,
        flush=True,
    )
    return status
