"""Lightning plumbing around a run: crash-safe checkpoints, the best adapter at the end of fit, predictions CSV."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .adapter import atomic_write, save_adapter

__all__ = ["AtomicCheckpointIO", "PredictionWriter", "SaveBestAdapter", "run_dir"]

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run's outputs: the logger's version dir, else the trainer's root dir.

    Under DDP every rank must call this (it broadcasts rank 0's answer).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO that never leaves a torn file (temp file, fsync, rename) and never unpickles code on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class SaveBestAdapter(L.Callback):
    """At the end of fit, write the best checkpoint (by the checkpoint callback's monitor; the last weights when
    nothing is monitored) as an adapter directory `<run dir>/adapter`.

    Args:
        dirname: name of the adapter directory inside the run directory.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_dir(trainer) / self.dirname
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if best and Path(best).is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state)
        save_adapter(
            pl_module.model,
            out,
            class_names=pl_module.class_names,
            metadata={
                "backbone": pl_module.hparams.backbone,
                "weights": pl_module.hparams.weights,
                "data_config": pl_module.data_config,
                "checkpoint": str(best) if best else None,
            },
        )
        pl_module.load_state_dict(current)
        rank_zero_info(f"Adapter of the best checkpoint written to {out}")


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.csv` in the run directory: path, predicted class, confidence and the top-5.

    Args:
        filename: name of the CSV file inside the run directory.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = self.filename if trainer.world_size == 1 else f"{Path(self.filename).stem}-rank{trainer.global_rank}.csv"
        self.path = run_dir(trainer) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["path", "prediction", "confidence", "top5"])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        names = pl_module.class_names
        probs = prediction["probs"].float().cpu()
        k = min(5, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1) if len(probs) else (probs, probs.long())
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for path, ps, idx in zip(prediction["paths"], top_p.tolist(), top_i.tolist(), strict=True):
                top5 = ";".join(f"{names[i]}:{p:.4f}" for p, i in zip(ps, idx, strict=True))
                writer.writerow([path, names[idx[0]], f"{ps[0]:.4f}", top5])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Predictions written to {self.path}")
