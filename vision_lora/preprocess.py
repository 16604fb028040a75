"""Preprocessing in one place: timm's eval transform from a data config, and image bytes from a client to RGB.

Export verification, int8 calibration and evaluation, and `vision-lora serve` all call `eval_transform`, so a served
model sees exactly the pixels its export was verified on.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torch import Tensor
from torchvision import transforms

from .data.decode import load_rgb

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "decode_image", "eval_stages", "eval_transform"]

DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLargeError(ValueError):
    """The image header announces more pixels than allowed; nothing was decoded."""


def eval_transform(data_config: Mapping[str, Any]) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform of a timm data config: resize (shorter side to input_size / crop_pct), centre crop
    to input_size, to tensor, normalise. Returns a (3, H, W) float32 tensor per RGB PIL image.

    Args:
        data_config: input_size (3, H, W), interpolation, mean, std, crop_pct and optionally crop_mode, as in
            `timm.data.resolve_data_config` or the metadata `export_onnx` stores.
    """
    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=False,
        interpolation=data_config.get("interpolation", "bicubic"),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config.get("crop_pct", 1.0),
        crop_mode=data_config.get("crop_mode") or "center",
    )


def eval_stages(
    data_config: Mapping[str, Any],
) -> tuple[Callable[[Image.Image], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """`eval_transform` in two stages, for serving: the geometry of one image, then the normalisation of a batch.

    The first stage resizes and crops one RGB image to a uint8 array (H, W, 3), a quarter of the bytes of the float
    tensor; the second turns a stack of them (N, H, W, 3) into the float32 batch (N, 3, H, W) with the same operations
    as `eval_transform`, so the result is identical, bit for bit, and the per-pixel arithmetic runs once per batch.

    Raises:
        ValueError: timm's eval transform does not end in to-tensor + normalise (a timm version this was not made for).
    """
    steps = eval_transform(data_config).transforms
    if len(steps) < 2 or not isinstance(steps[-2], (MaybeToTensor, transforms.ToTensor)):
        raise ValueError(f"unexpected eval transform {steps}: it should end with ToTensor and Normalize.")
    normalize = steps[-1]
    if not isinstance(normalize, transforms.Normalize):
        raise ValueError(f"unexpected eval transform {steps}: it should end with ToTensor and Normalize.")
    geometry = transforms.Compose(steps[:-2])
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(geometry(image), dtype=np.uint8)  # (H, W, 3)

    def batch(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
        return x.sub_(mean).div_(std).contiguous().numpy()

    return pixels, batch


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, BMP, GIF's first frame, ...) to 8-bit RGB as `load_rgb` reads files:
    upright by EXIF orientation, transparency on white.

    The pixel count is read from the header and checked before anything is decoded, so a decompression bomb is
    refused in about the time it takes to parse its header.

    Raises:
        ImageTooLargeError: more than `max_pixels` pixels.
        ValueError: empty, not an image, or truncated / corrupt.
    """
    if not data:
        raise ValueError("empty body: send the image bytes")
    try:
        with Image.open(io.BytesIO(data)) as header:  # parses the header only
            width, height = header.size
    except Image.DecompressionBombError as err:  # PIL's own limit, at twice its MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image, or in a format Pillow cannot read") from None
    except Exception as err:  # PIL raises many types on malformed input
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from None
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} = {width * height:,} pixels, the limit is {max_pixels:,}"
        )
    try:
        return load_rgb(io.BytesIO(data))
    except Exception as err:
        raise ValueError(f"cannot decode the image ({type(err).__name__}: {err})") from None
