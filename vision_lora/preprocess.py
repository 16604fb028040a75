"""The one owner of the data config (input size, resize interpolation, crop, normalisation): resolved once from
timm's config of a model plus the user's overrides, completed with the defaults in one place, written into checkpoints
and ONNX metadata, and turned into the evaluation transform.

Training, export verification, int8 calibration and evaluation, and `vision-lora serve` all call `eval_transform`, so
a served model sees exactly the pixels its export was verified on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import resolve_data_config as timm_resolve_data_config
from timm.data.transforms import MaybeToTensor
from torch import Tensor, nn
from torchvision import transforms

from .errors import VisionLoRAError

__all__ = [
    "DATA_CONFIG_DEFAULTS",
    "DATA_CONFIG_KEYS",
    "complete_data_config",
    "data_config_record",
    "eval_stages",
    "eval_transform",
    "resolve_data_config",
]

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# What a recorded config that lacks a key (an older checkpoint, another producer's ONNX file) means by it.
DATA_CONFIG_DEFAULTS: dict[str, Any] = {
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def resolve_data_config(source: nn.Module | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict:
    """timm's data config of a model (or of its `pretrained_cfg` mapping) with `overrides` on top (input_size as a
    side or (3, H, W), mean, std, interpolation, crop_pct, crop_mode); None values are ignored.

    Returns:
        A dict like timm's `resolve_data_config`: input_size (3, H, W), interpolation, mean, std, crop_pct, crop_mode.

    Raises:
        VisionLoRAError: mean or std without three values.
    """
    pretrained_cfg = (getattr(source, "pretrained_cfg", None) if isinstance(source, nn.Module) else source) or {}
    args: dict[str, Any] = {"in_chans": 3}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("mean", "std") and len(value) != 3:
            raise VisionLoRAError(f"{key} needs three values (R, G, B), got {tuple(value)}.")
        if key == "input_size":
            args["input_size" if isinstance(value, (list, tuple)) else "img_size"] = value
        else:
            args[key] = value
    return timm_resolve_data_config(args=args, pretrained_cfg=dict(pretrained_cfg))


def complete_data_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded data config (checkpoint, adapter, ONNX metadata) with `DATA_CONFIG_DEFAULTS` for what it lacks and
    plain types: input_size a tuple of ints, mean and std tuples of floats, crop_pct a float. Other keys are kept.

    Raises:
        VisionLoRAError: no input_size, or one that is not (channels, height, width).
    """
    out = dict(config)
    for key, default in DATA_CONFIG_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = default
    if len(tuple(out.get("input_size") or ())) != 3:
        raise VisionLoRAError(
            f"data_config['input_size'] must be (channels, height, width), got {out.get('input_size')}."
        )
    out["input_size"] = tuple(int(s) for s in out["input_size"])
    out["mean"] = tuple(float(m) for m in out["mean"])
    out["std"] = tuple(float(s) for s in out["std"])
    out["crop_pct"] = float(out["crop_pct"])
    return out


def data_config_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """The data config as JSON values (lists, floats), complete: what checkpoints, adapters and ONNX metadata store."""
    full = complete_data_config(config)
    return {key: list(full[key]) if isinstance(full[key], tuple) else full[key] for key in DATA_CONFIG_KEYS}


def eval_transform(data_config: Mapping[str, Any]) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform of a data config: resize (shorter side to input_size / crop_pct), centre crop to
    input_size, to tensor, normalise. Returns a (3, H, W) float32 tensor per RGB PIL image.

    Args:
        data_config: as `resolve_data_config` returns it, or as a checkpoint or ONNX file recorded it (missing keys
            take `DATA_CONFIG_DEFAULTS`).
    """
    cfg = complete_data_config(data_config)
    return create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )


def eval_stages(
    data_config: Mapping[str, Any],
) -> tuple[Callable[[Image.Image], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """`eval_transform` in two stages, for serving: the geometry of one image, then the normalisation of a batch.

    The first stage resizes and crops one RGB image to a uint8 array (H, W, 3), a quarter of the bytes of the float
    tensor; the second turns a stack of them (N, H, W, 3) into the float32 batch (N, 3, H, W) with the same operations
    as `eval_transform`, so the result is identical, bit for bit, and the per-pixel arithmetic runs once per batch.

    Raises:
        VisionLoRAError: timm's eval transform does not end in to-tensor + normalise (a timm version this was not
            made for).
    """
    steps = eval_transform(data_config).transforms
    if len(steps) < 2 or not isinstance(steps[-2], (MaybeToTensor, transforms.ToTensor)):
        raise VisionLoRAError(f"unexpected eval transform {steps}: it should end with ToTensor and Normalize.")
    normalize = steps[-1]
    if not isinstance(normalize, transforms.Normalize):
        raise VisionLoRAError(f"unexpected eval transform {steps}: it should end with ToTensor and Normalize.")
    geometry = transforms.Compose(steps[:-2])
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(geometry(image), dtype=np.uint8)  # (H, W, 3)

    def batch(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
        return x.sub_(mean).div_(std).contiguous().numpy()

    return pixels, batch
