"""Where a run writes and where its checkpoints are found.

`RunLogger`: Lightning's CSVLogger, safe for sweeps: each new run claims its `version_<n>` folder atomically, so runs
started at the same moment never share one, and a resumed (or reused) version folder keeps its
`metrics.csv` and appends to it, where CSVLogger deletes it. `OutputCheck`: the folders a fit writes into are tried
before the first training step, not found unwritable at the first checkpoint an epoch later. `resolve_checkpoint`
and `resolve_last_for_fit`: what `--ckpt_path best` / `last` mean."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from ._io import write_error
from .errors import VisionLoRAError

__all__ = [
    "OutputCheck",
    "RunLogger",
    "check_writable",
    "checkpoint_run_dir",
    "resolve_checkpoint",
    "resolve_last_for_fit",
    "runs_dir_of",
]

_MAX_VERSIONS = 100_000


class _AppendingWriter(ExperimentWriter):
    """CSVLogger's writer, except that an existing `metrics.csv` is continued (header included), not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments: `save_dir`, `name`, `version`, ...) for runs that may start together or
    be resumed.

    CSVLogger picks the next version by listing the folders that exist, then creates it later: two runs started at
    the same moment can pick the same one. Here the folder is claimed with `os.mkdir`, which only one process can win;
    the loser tries the next number. A run resumed into its version folder appends to its `metrics.csv`.
    """

    def _get_next_version(self) -> int:
        guess = super()._get_next_version()
        if not isinstance(self._fs, LocalFileSystem) or rank_zero_only.rank != 0:
            return guess  # DDP ranks > 0 never write logs; object stores have no atomic mkdir
        root = Path(self.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        for version in range(guess, guess + _MAX_VERSIONS):
            try:
                os.mkdir(root / f"version_{version}")
            except FileExistsError:
                continue
            return version
        raise RuntimeError(f"No free version folder under {root}")

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        """CSVLogger's writer, appending to the version folder's `metrics.csv` when there is one."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and write (then remove) a small file in it.

    Raises:
        VisionLoRAError: it cannot be written; the message names the folder and the cause in the errno's words.
    """
    probe = Path(folder) / f".vision_lora_write_test.{uuid.uuid4().hex[:8]}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        message = str(write_error(folder, err)).split(";")[0]
        raise VisionLoRAError(
            f"{message}. Choose an output folder you can write to (--trainer.default_root_dir, "
            "--trainer.logger.init_args.save_dir or --checkpoint.dirpath)."
        ) from None


class OutputCheck(L.Callback):
    """Before the first training step of a fit, check that the run folder and every checkpoint folder can be written
    (rank 0 checks; every rank stops)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folders = {trainer.log_dir or trainer.default_root_dir}
        folders |= {c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
        error = None
        if trainer.is_global_zero:
            try:
                for folder in sorted(folders):
                    check_writable(folder)
            except ValueError as err:
                error = str(err)
        error = trainer.strategy.broadcast(error)
        if error:
            raise VisionLoRAError(error)


def checkpoint_run_dir(ckpt_path: str | Path) -> Path:
    """The run a checkpoint belongs to: the folder above `checkpoints/`, else the checkpoint's own folder."""
    folder = Path(ckpt_path).parent
    return folder.parent if folder.name == "checkpoints" else folder


def resolve_last_for_fit(config: Any) -> None:
    """Turn `fit --ckpt_path last` into the `last.ckpt` of this run and keep logging into that run's version folder.

    The run is the logger's `version` when given (the line printed on preemption gives it), else the only version
    under `<save_dir>/<name>` that has a last.ckpt: in a sweep, never the newest last.ckpt of some other run.
    Lightning alone would look for "last" only in the new run's (empty) directory and silently start from scratch.

    Raises:
        VisionLoRAError: several versions have a last.ckpt and none was chosen.
    """
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None)
    version = init_args.get("version") if init_args is not None else None
    if config.checkpoint.get("dirpath"):
        candidates = [Path(config.checkpoint.dirpath) / "last.ckpt"]
    elif init_args is not None and init_args.get("save_dir") is not None:
        root = Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
        if version is not None:
            run = root / (version if isinstance(version, str) else f"version_{version}")
            candidates = [run / "checkpoints" / "last.ckpt"]
        else:
            candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"))
    else:
        candidates = [Path(config.trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:  # as in Lightning, "last" may be set before the first run: start one, and say so
        rank_zero_warn("--ckpt_path last: no last.ckpt of this run exists yet; starting a new run.")
        config.ckpt_path = None
        return
    if len(candidates) > 1:
        versions = ", ".join(c.parent.parent.name for c in candidates)
        raise VisionLoRAError(
            f"--ckpt_path last: several runs under {root} have a last.ckpt ({versions}); choose yours with "
            f"--trainer.logger.init_args.version=N (or give each run its own --trainer.logger.init_args.name)."
        )
    last = candidates[0]
    config.ckpt_path = str(last)
    version_dir = last.parent.parent
    if init_args is not None and version_dir.name.startswith("version_") and not config.checkpoint.get("dirpath"):
        init_args.version = int(version_dir.name.removeprefix("version_"))
    rank_zero_info(f"Resuming from {last}")


def runs_dir_of(config: Any) -> Path:
    """Where the runs of a config are: the run itself for a run's own `config.yaml`, else checkpoint.dirpath, else
    `<logger save_dir>/<logger name>`, else `<default_root_dir>/lightning_logs`."""
    for path in config.get("config") or []:
        folder = Path(str(path)).parent
        if (folder / "checkpoints").is_dir():
            return folder
    if config.checkpoint.get("dirpath"):
        return Path(config.checkpoint.dirpath)
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is not None and init_args.get("save_dir") is not None:
        return Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
    return Path(config.trainer.get("default_root_dir") or "runs") / "lightning_logs"


def _checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints" if (run / "checkpoints").is_dir() else run


def _best_of(run: Path) -> Path:
    """The best checkpoint of a run, as its monitoring ModelCheckpoint recorded it in the newest checkpoint."""
    folder = _checkpoint_dir(run)
    newest = max(folder.glob("*.ckpt"), key=lambda c: c.stat().st_mtime)
    state = torch.load(newest, map_location="cpu", weights_only=True).get("callbacks", {})
    for key, value in state.items():
        if key.startswith("ModelCheckpoint") and value.get("monitor") and value.get("best_model_path"):
            best = folder / Path(value["best_model_path"]).name
            if best.is_file():
                return best
    bests = sorted(folder.glob("best*.ckpt"))
    if len(bests) == 1:
        return bests[0]
    raise VisionLoRAError(
        f"cannot tell the best checkpoint of {run}: "
        + (", ".join(map(str, bests)) or "it has no best*.ckpt")
        + "; pass --ckpt_path <file>."
    )


def resolve_checkpoint(which: str, runs_dir: str | Path) -> Path:
    """`--ckpt_path best` / `last`: that checkpoint of the newest run under `runs_dir` (a logger's
    `<save_dir>/<name>` holding `version_*` runs, one run, or a checkpoint folder).

    Raises:
        VisionLoRAError: no run there, or the newest runs were written at the same time (the candidates are listed).
    """
    root = Path(runs_dir)
    runs = [d for d in [*sorted(root.glob("version_*")), root] if any(_checkpoint_dir(d).glob("*.ckpt"))]
    if not runs:
        elsewhere = sorted(str(c.parent.parent) for c in root.parent.glob("*/version_*/checkpoints/*.ckpt"))
        hint = f" Runs elsewhere: {', '.join(sorted(set(elsewhere)))}." if elsewhere else ""
        raise VisionLoRAError(
            f"--ckpt_path {which}: no checkpoint under {root}.{hint} Pass the --config of the fit that wrote it, or "
            f"a checkpoint file."
        )

    def span(run: Path) -> tuple[float, float]:
        times = [c.stat().st_mtime for c in _checkpoint_dir(run).glob("*.ckpt")]
        times += [f.stat().st_mtime for f in (run / "config.yaml", run / "hparams.yaml") if f.is_file()]
        return min(times), max(times)

    runs.sort(key=lambda r: span(r)[1])
    if len(runs) > 1 and span(runs[-2])[1] > span(runs[-1])[0]:
        overlapping = [str(r) for r in runs if span(r)[1] > span(runs[-1])[0]]
        raise VisionLoRAError(
            f"--ckpt_path {which}: several runs under {root} were written at the same time ({', '.join(overlapping)}); "
            f"pass a checkpoint file."
        )
    run = runs[-1]
    if which == "best":
        return _best_of(run)
    last = _checkpoint_dir(run) / "last.ckpt"
    if not last.is_file():
        raise VisionLoRAError(f"--ckpt_path last: {run} has no last.ckpt; pass a checkpoint file.")
    return last
