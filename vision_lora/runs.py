"""RunLogger: Lightning's CSVLogger, safe for sweeps. Each new run claims its `version_<n>` folder atomically, so runs
started at the same moment never share one; a resumed (or reused) version folder keeps its `metrics.csv` and appends
to it, where CSVLogger deletes it."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["RunLogger"]

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
