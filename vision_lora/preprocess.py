"""Preprocessing in one place: timm's eval transform from a data config, and image bytes from a client to RGB.

Export verification, int8 calibration and evaluation, and `vision-lora serve` all call `eval_transform`, so a served
model sees exactly the pixels its export was verified on.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image
from timm.data import create_transform
from torch import Tensor

from .data.decode import load_rgb

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "decode_image", "eval_transform"]

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
