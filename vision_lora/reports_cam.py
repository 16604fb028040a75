"""Grad-CAM overlays on the images of errors.png. Validation and test run under `torch.inference_mode`, so the maps
come from a second pass, with gradients, over the stored network inputs of the shown images, on an evaluation copy of
the network: the module being trained is left exactly as it is."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .explain import grad_cam, overlay
from .reports import Predictions

__all__ = ["add_cams", "cam_maps", "explained_class"]


def explained_class(predictions: Predictions, position: int) -> int:
    """The class the map of sample `position` explains: its predicted class; multi-label: its most confident false
    positive, else its most confident false negative (else its top-scoring class)."""
    if predictions.thresholds is None:
        return int(predictions.preds[position])
    probs, targets, preds = (a[position] for a in (predictions.scores, predictions.targets, predictions.preds))
    added = np.flatnonzero((targets == 0) & (preds == 1))
    if len(added):
        return int(added[np.argmax(probs[added])])
    missed = np.flatnonzero((targets == 1) & (preds == 0))
    return int(missed[np.argmin(probs[missed])]) if len(missed) else int(np.argmax(probs))


def cam_maps(predictions: Predictions, net: nn.Module, layer: str | None = None) -> dict[int, np.ndarray]:
    """Grad-CAM maps (H, W in [0, 1]) of the samples whose inputs `predictions` keeps, by position, each for its
    `explained_class`, computed on a deep copy of `net` in eval mode (on `net`'s device and dtype).

    Args:
        predictions: an evaluation pass (`EvalPredictions.predictions`).
        net: the classifier returning logits (a `LoRAClassifier`'s `.model`); it is not run, only copied.
        layer: the module to read (`explain.cam_layer`); default a ViT's last `norm1`, else the last feature stage.
    """
    positions = sorted(predictions.inputs)
    if not positions:
        return {}
    with torch.inference_mode(False):
        probe = copy.deepcopy(net).eval()
        param = next((p for p in probe.parameters() if p.is_floating_point()), None)
        device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
        x = torch.from_numpy(np.stack([predictions.inputs[p] for p in positions])).to(device, dtype)  # (N, 3, H, W)
        classes = torch.tensor([explained_class(predictions, p) for p in positions])  # (N,)
        maps = grad_cam(probe, x, classes, layer).cpu().numpy()  # (N, H, W)
    return dict(zip(positions, maps, strict=True))


def add_cams(predictions: Predictions, net: nn.Module, layer: str | None = None) -> tuple[Predictions, str | None]:
    """`predictions` with the Grad-CAM map of `cam_maps` blended over each stored image, and a `cam_note` saying what
    the maps show; where the pass fails (a model Grad-CAM cannot read), `predictions` as they are and the reason in one
    line: the report is written either way.

    Returns:
        (the predictions to draw, None or why they carry no overlays).
    """
    try:
        maps = cam_maps(predictions, net, layer)
    except Exception as err:  # any model a user brings: the report must not be lost to its maps
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        return predictions, f"{type(err).__name__}: {reason}"
    if not maps:
        return predictions, None
    images = {**predictions.images, **{p: overlay(predictions.images[p], cam) for p, cam in maps.items()}}
    if predictions.thresholds is None:
        note = "Grad-CAM of the predicted class"
    else:
        note = "Grad-CAM of the most confident added class, else missed"
    return replace(predictions, images=images, cam_note=note), None
