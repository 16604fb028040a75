"""Where a run writes. `RunLogger`: Lightning's CSVLogger, safe for sweeps: each new run claims its `version_<n>` folder
atomically, so runs started at the same moment never share one, and a resumed (or reused) version folder keeps its
`metrics.csv` and appends to it, where CSVLogger deletes it. `OutputCheck`: the folders a fit writes into are tried
before the first training step, not found unwritable at the first checkpoint an epoch later."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

import lightning as L
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ._io import write_error

__all__ = ["OutputCheck", "RunLogger", "check_writable"]

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
        ValueError: it cannot be written; the message names the folder and the cause in the errno's words.
    """
    probe = Path(folder) / f".vision_lora_write_test.{uuid.uuid4().hex[:8]}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        message = str(write_error(folder, err)).split(";")[0]
        raise ValueError(
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
            raise ValueError(error)
