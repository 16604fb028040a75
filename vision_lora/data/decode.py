"""Decoding image files into RGB: EXIF orientation, 16-bit and alpha handling, a pixel limit read from the header,
and JPEG decoding at reduced scale (libjpeg's DCT scaling) where the transform never needs full resolution."""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.functional import pil_modes_mapping

from ..errors import VisionLoRAError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImagePipeline",
    "ImageSource",
    "ImageTooLargeError",
    "decode_image",
    "load_rgb",
    "max_pixels",
    "open_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

ImageSource = str | os.PathLike | bytes
"""A file path, or the encoded bytes of an image (as an optimized dataset stores them)."""

DEFAULT_MAX_PIXELS = 40_000_000  # the largest image a client may send to `vision-lora serve`
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageTooLargeError(VisionLoRAError):
    """The image header announces more pixels than allowed; nothing was decoded."""


def max_pixels() -> int | None:
    """Largest image (width × height) decoded; larger files are refused from their header. PIL's own
    decompression-bomb threshold, `PIL.Image.MAX_IMAGE_PIXELS` (None disables the check)."""
    return Image.MAX_IMAGE_PIXELS


def open_image(source: ImageSource) -> Image.Image:
    """Open an image lazily (only the header is read) and refuse one over `max_pixels()`.

    Raises:
        OSError / ValueError: not a readable image, or too large to decode safely.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    limit = max_pixels()
    if limit is not None and image.width * image.height > limit:
        size = f"{image.width}x{image.height}"
        image.close()
        raise VisionLoRAError(f"{size} pixels is over the decoding limit of {limit:,} (a decompression bomb?)")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: treat the image as upright
        return 1


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header alone."""
    return (image.height, image.width) if _orientation(image) in _SWAPS_AXES else image.size


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the pixels as stored
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "LAB":  # PIL converts LAB to RGB only through a colour transform
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, lab_to_srgb)
    if image.mode in ("F", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257  # 65535 -> 255, not clipped at 255
        image = Image.fromarray(np.round(levels).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _decode(image: Image.Image, reduction: int) -> Image.Image:
    """Decode an opened image at 1/`reduction` scale where the format allows it (JPEG), upright and RGB."""
    if reduction > 1 and image.format == "JPEG":
        image.draft(None, (max(image.width // reduction, 1), max(image.height // reduction, 1)))
    image.load()  # decode now, so a truncated file fails here
    return _to_rgb(_upright(image))


def _reduction(allowed: float) -> int:
    """The largest JPEG DCT scale factor (1, 2, 4 or 8) not above `allowed`."""
    return next(k for k in (8, 4, 2, 1) if k <= allowed) if allowed >= 1 else 1


def load_rgb(source: ImageSource, min_side: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB, upright according to its EXIF orientation.

    Transparent pixels are composited on white; 16-bit grayscale is scaled to 0..255 rather than clipped; a
    multi-frame file gives its first frame.

    Args:
        source: a file path or encoded bytes.
        min_side: where given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its shorter side stays at
            least this many pixels.

    Raises:
        OSError / ValueError: the file is missing, not a readable image, or over `max_pixels()`.
    """
    with open_image(source) as image:
        reduction = _reduction(min(image.size) / min_side) if min_side else 1
        return _decode(image, reduction)


class _Size(Image.Image):
    """An image of a given size and no pixels, for timm's crop sampling, which only reads the size."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__()
        self._size = (width, height)


class ImagePipeline:
    """Image file → tensor with a timm transform, decoding JPEGs at the smallest DCT scale the transform allows.

    For training (timm's random-resized crop first) the crop box is drawn from the full image size, read from the
    header, exactly as timm draws it; the image is then decoded at the largest reduction that leaves the box at
    least as large as the network input, and the box is resized from that decode. For evaluation (resize, then
    centre crop) the reduction keeps the resized side at least as large as the resize target. Other transforms,
    and non-JPEG files, decode at full size. With `reduce=False` every image decodes at full size.

    Args:
        transform: a timm train or eval transform (`timm.data.create_transform`), applied to RGB PIL images.
        reduce: allow reduced-scale decoding.
    """

    def __init__(self, transform: Callable[[Image.Image], Tensor], reduce: bool = True) -> None:
        self.transform = transform
        self.reduce = reduce
        steps = list(getattr(transform, "transforms", []))
        first = steps[0] if steps else None
        self._crop = first if isinstance(first, RandomResizedCropAndInterpolation) else None
        self._rest = T.Compose(steps[1:]) if self._crop is not None else None
        self._resize = first if isinstance(first, T.Resize) else None
        second = steps[1] if len(steps) > 1 else None
        self._center = second.size if isinstance(second, T.CenterCrop) and self._resize is not None else None

    def __call__(self, source: ImageSource) -> Tensor:
        if self._crop is not None:
            return self._train(source)
        with open_image(source) as image:
            return self.transform(self._cut_long_side(_decode(image, self._eval_reduction(image))))

    def _cut_long_side(self, rgb: Image.Image) -> Image.Image:
        """Cut an extreme panorama or banner to the middle part that the eval centre crop keeps, before the resize
        (which would otherwise make a 1 x 10,000 banner 96 x 960,000 pixels on its way to a 96 px crop)."""
        size = self._resize.size if self._center is not None else None
        if size is None or not (isinstance(size, int) or len(size) == 1):
            return rgb
        target = size if isinstance(size, int) else size[0]
        short = min(rgb.size)
        crop_h, crop_w = self._center
        keep_w = max(short, math.ceil(crop_w * short / target) + 2)
        keep_h = max(short, math.ceil(crop_h * short / target) + 2)
        if rgb.width <= 2 * keep_w and rgb.height <= 2 * keep_h:
            return rgb  # every ordinary photo: untouched
        left, top = max(0, (rgb.width - keep_w) // 2), max(0, (rgb.height - keep_h) // 2)
        return rgb.crop((left, top, min(rgb.width, left + keep_w), min(rgb.height, top + keep_h)))

    def _eval_reduction(self, image: Image.Image) -> int:
        if not self.reduce or self._resize is None:
            return 1
        size = self._resize.size
        if isinstance(size, int) or len(size) == 1:  # shorter side to `size`
            return _reduction(min(image.size) / (size if isinstance(size, int) else size[0]))
        return _reduction(min(image.size) / max(size))  # squash: both sides at least their targets

    def _train(self, source: ImageSource) -> Tensor:
        crop = self._crop
        with open_image(source) as image:
            width, height = _oriented_size(image)
            top, left, h, w = crop.get_params(_Size(width, height), crop.scale, crop.ratio)  # timm's own draws
            interpolation = crop.interpolation
            if isinstance(interpolation, (tuple, list)):
                interpolation = random.choice(interpolation)
            out_h, out_w = crop.size
            reduction = _reduction(min(w / out_w, h / out_h)) if self.reduce else 1
            rgb = _decode(image, reduction)
        resample = pil_modes_mapping[interpolation]
        if rgb.size == (width, height):  # full size: exactly timm's crop, then resize
            return self._rest(rgb.crop((left, top, left + w, top + h)).resize((out_w, out_h), resample))
        sx, sy = rgb.width / width, rgb.height / height  # the decode's actual scale (it rounds sizes up)
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)  # sub-pixel box in the reduced image
        return self._rest(rgb.resize((out_w, out_h), resample, box=box))

    def __repr__(self) -> str:
        return f"ImagePipeline(reduce={self.reduce}, transform={self.transform!r})"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, BMP, GIF's first frame, ...) to 8-bit RGB as `load_rgb` reads files:
    upright by EXIF orientation, transparency on white.

    The pixel count is read from the header and checked before anything is decoded, so a decompression bomb is
    refused in about the time it takes to parse its header.

    Raises:
        ImageTooLargeError: more than `max_pixels` pixels.
        VisionLoRAError: empty, not an image, or truncated / corrupt.
    """
    if not data:
        raise VisionLoRAError("empty body: send the image bytes")
    try:
        with Image.open(io.BytesIO(data)) as header:  # parses the header only
            width, height = header.size
    except Image.DecompressionBombError as err:  # PIL's own limit, at twice its MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise VisionLoRAError("not an image, or in a format Pillow cannot read") from None
    except Exception as err:  # PIL raises many types on malformed input
        raise VisionLoRAError(f"not a readable image ({type(err).__name__}: {err})") from None
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} = {width * height:,} pixels, the limit is {max_pixels:,}"
        )
    try:
        return load_rgb(io.BytesIO(data))
    except Exception as err:
        raise VisionLoRAError(f"cannot decode the image ({type(err).__name__}: {err})") from None
