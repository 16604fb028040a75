"""The multi-label and class-weight side of `LoRAClassifier`: the BCE loss, the scoring of a multi-label pass at
per-class thresholds chosen on val, and loss weights from the training counts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from .errors import VisionLoRAError
from .multilabel import CLASS_WEIGHTS, choose_thresholds, class_weights, multilabel_metrics

__all__ = ["LabelTasks", "monitor_for_task"]


def monitor_for_task(checkpoint: Any, task: str | None) -> bool:
    """Point a checkpoint callback that monitors `val_acc` at `val_map` for a multi-label run (which has no
    accuracy); returns whether it changed."""
    if task != "multilabel" or checkpoint is None or getattr(checkpoint, "monitor", None) != "val_acc":
        return False
    checkpoint.monitor = "val_map"
    checkpoint.filename = "best-{epoch:02d}-{val_map:.4f}"
    return True


class LabelTasks:
    """Methods `LoRAClassifier` mixes in: it provides `task`, `thresholds` (multi-label), `_kept`, `_named_absent`,
    `_loss_weight`, `class_names` and Lightning's `log` / `trainer`."""

    def use_class_weights(self, kind: str) -> None:
        """Weight the loss by `kind` (see `class_weights`) from the attached data's training counts, from the next
        step on (also the recipe screen's candidates).

        Raises:
            VisionLoRAError: an unknown kind, or weights without an attached DataModule that knows its counts.
        """
        if kind not in CLASS_WEIGHTS:
            raise VisionLoRAError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, not {kind!r}.")
        self.hparams.class_weights = kind
        if kind == "none":
            self._loss_weight = None
            return
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if data is None or not hasattr(data, "train_class_counts"):
            raise VisionLoRAError("model.class_weights needs the training data's class counts: fit with a DataModule.")
        counts = data.train_class_counts()
        total = len(data.folder.samples("train")[0]) if getattr(data, "folder", None) is not None else sum(counts)
        weights = class_weights(counts, kind, multilabel=self.task == "multilabel", total=total)
        self._loss_weight = weights.to(self.device)

    # -- steps ---------------------------------------------------------------------------------------------------

    def _multilabel_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """BCE with logits over (B, C), with `pos_weight` when class weights are on."""
        weight = self._loss_weight.to(logits.device) if self._loss_weight is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight)

    def on_validation_epoch_start(self) -> None:
        if self.task == "multilabel":
            self._kept["val"] = []

    def on_test_epoch_start(self) -> None:
        if self.task == "multilabel":
            self._kept["test"] = []

    def on_validation_epoch_end(self) -> None:
        if self.task == "multilabel":
            self._multilabel_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        if self.task == "multilabel":
            self._multilabel_epoch_end("test")

    def _multilabel_epoch_end(self, stage: str) -> None:
        """Score the pass: on val, first choose the per-class thresholds (kept in `thresholds`, so in checkpoints);
        on test, use the stored ones. Gathered across DDP ranks, so every rank logs the same values."""
        kept, self._kept[stage] = self._kept[stage], []
        mine = (torch.cat([p for p, _ in kept]), torch.cat([t for _, t in kept])) if kept else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        parts = [part for part in everyone if part is not None]
        if not parts:
            return
        probs, targets = torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])  # (N, C)
        if stage == "val":
            self.thresholds.copy_(choose_thresholds(probs, targets).to(self.thresholds.device))
        metrics, absent = multilabel_metrics(probs, targets, self.thresholds.cpu())
        if absent and stage not in self._named_absent and not self.trainer.sanity_checking:
            self._named_absent.add(stage)
            names = ", ".join(self.class_names[i] for i in absent)
            rank_zero_info(f"{stage}: class(es) without a positive image, left out of {stage}_map: {names}")
        for name, value in metrics.items():
            self.log(f"{stage}_{name}", value, prog_bar=name == "map", batch_size=len(probs))
