"""Multi-label scoring: per-class average precision, per-class thresholds chosen on val, and the metrics at those
thresholds (micro / macro F1, exact match); plus class weights against imbalance for both tasks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import VisionLoRAError

__all__ = [
    "CLASS_WEIGHTS",
    "DEFAULT_THRESHOLD",
    "average_precision",
    "choose_thresholds",
    "class_weights",
    "label_sets",
    "multilabel_metrics",
]

DEFAULT_THRESHOLD = 0.5  # of a class without a positive in val, where no threshold can be chosen
CLASS_WEIGHTS = ("none", "auto", "inverse", "effective")
_AUTO_WEIGHTS = "effective"  # what `class_weights="auto"` means (docs/imbalance.md)


def label_sets(logits: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A multi-label model's decisions from its logits (..., C), as `predict` and `serve` make them: the sigmoid in
    float32 and each class on at or over its threshold.

    Returns:
        ((..., C) bool label sets, (..., C) float32 probabilities).
    """
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float32)))
    return probs >= np.asarray(thresholds, dtype=np.float32), probs


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each class (torchmetrics' exact, tie-aware computation, as scikit-learn's).

    Args:
        scores: (N, C) scores (probabilities or logits: only their order counts).
        targets: (N, C) 0 / 1.

    Returns:
        (C,) float64; NaN for a class without a positive.
    """
    from torchmetrics.functional.classification import multilabel_average_precision

    present = targets.sum(0) > 0  # (C,)
    with warnings.catch_warnings():  # a class without a positive is NaN here, and named by the caller
        warnings.filterwarnings("ignore", message=".*[Nn]o positive samples.*")
        ap = multilabel_average_precision(scores.double(), targets.long(), targets.shape[1], average="none")
    return torch.where(present, ap.double(), torch.full_like(ap, math.nan, dtype=torch.float64))


def choose_thresholds(probs: Tensor, targets: Tensor) -> Tensor:
    """Per class, the probability threshold (`prob >= t` is positive) with the best F1 on these samples, halfway
    between the lowest score it calls positive and the next; `DEFAULT_THRESHOLD` for a class without a positive.

    Args:
        probs: (N, C) sigmoid probabilities.
        targets: (N, C) 0 / 1.

    Returns:
        (C,) float32.
    """
    ranked, order = probs.double().sort(dim=0, descending=True, stable=True)  # (N, C)
    hits = targets.double().gather(0, order)  # (N, C)
    positives = hits.sum(0)  # (C,)
    k = torch.arange(1, len(probs) + 1, dtype=torch.float64).unsqueeze(1)  # (N, 1) predicted positives
    f1 = 2 * hits.cumsum(0) / (k + positives)  # (N, C) F1 when the top k are called positive
    best = f1.argmax(0)  # (C,)
    # halfway between the last score called positive and the next one down: the same calls here, with a margin
    below = torch.cat([ranked, torch.zeros_like(ranked[:1])])  # (N + 1, C), a score of 0 below the lowest
    chosen = (below.gather(0, best.unsqueeze(0)) + below.gather(0, best.unsqueeze(0) + 1)).squeeze(0) / 2  # (C,)
    return torch.where(positives > 0, chosen, torch.full_like(chosen, DEFAULT_THRESHOLD)).float()


def multilabel_metrics(probs: Tensor, targets: Tensor, thresholds: Tensor) -> tuple[dict[str, float], list[int]]:
    """mAP, micro / macro F1 and exact match of (N, C) `probs` against (N, C) `targets` at (C,) `thresholds`.

    mAP and macro F1 average over the classes with at least one positive here.

    Returns:
        ({"map", "f1_micro", "f1_macro", "exact_match"}, the indices of the classes without a positive).
    """
    targets = targets.double()
    predicted = (probs.double() >= thresholds.double()).double()  # (N, C)
    tp = (predicted * targets).sum(0)  # (C,)
    fp = (predicted * (1 - targets)).sum(0)
    fn = ((1 - predicted) * targets).sum(0)
    present = targets.sum(0) > 0  # (C,)
    ap = average_precision(probs, targets)
    per_class_f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    denominator = float(2 * tp.sum() + fp.sum() + fn.sum())
    metrics = {
        "map": float(ap[present].mean()) if present.any() else math.nan,
        "f1_micro": float(2 * tp.sum()) / denominator if denominator else 0.0,
        "f1_macro": float(per_class_f1[present].mean()) if present.any() else math.nan,
        "exact_match": float((predicted == targets).all(1).double().mean()) if len(targets) else math.nan,
    }
    return metrics, [int(i) for i in torch.nonzero(~present).flatten()]


def class_weights(counts: Sequence[int], kind: str = "auto", multilabel: bool = False, total: int = 0) -> Tensor:
    """Loss weights from the training counts of each class.

    Single-label: the cross-entropy weight of each class, "inverse" frequency (N / (C n_c)) or the "effective"
    number of samples (Cui et al. 2019: (1 - b) / (1 - b^n_c) with b = 1 - 1/N), both scaled to average 1 over the
    classes that occur. Multi-label: BCE's `pos_weight`, negatives / positives of each class (both kinds).

    Args:
        counts: training images (multi-label: positives) of each class.
        kind: "inverse", "effective" or "auto" (the effective number).
        multilabel: weights for `BCEWithLogitsLoss(pos_weight=...)`.
        total: training images (multi-label only).

    Returns:
        (C,) float32; 0 for a single-label class without training images, 1 for a multi-label one.
    """
    if kind not in CLASS_WEIGHTS or kind == "none":
        raise VisionLoRAError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, not {kind!r}.")
    n = torch.tensor(list(counts), dtype=torch.float64)  # (C,)
    if multilabel:
        return torch.where(n > 0, (total - n) / n.clamp(min=1), torch.ones_like(n)).float()
    kind = _AUTO_WEIGHTS if kind == "auto" else kind
    present = n > 0
    if kind == "inverse":
        raw = n.sum() / n.clamp(min=1)
    else:
        beta = 1.0 - 1.0 / float(n.sum())
        raw = (1.0 - beta) / (1.0 - beta ** n.clamp(min=1))
    raw = torch.where(present, raw, torch.zeros_like(raw))
    return (raw * present.sum() / raw.sum()).float()
