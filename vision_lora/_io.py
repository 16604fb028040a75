"""Crash-safe file writes and the facts recorded with every file vision_lora writes (package versions, the timm
architecture of a model)."""

from __future__ import annotations

import errno
import io
import os
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from .errors import VisionLoRAError

__all__ = ["atomic_write", "model_name", "package_versions", "torch_bytes", "write_error"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file so that a crash at any moment leaves either the old file or the new one, never a torn one.

    `write(tmp_path)` writes to a temporary file in the same directory, which is fsynced and renamed over `path`.

    Raises:
        OSError: the write failed (disk full, file-size limit, read-only or missing folder); the message names `path`
            and the cause, and the file that was at `path` is unchanged.
    """
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # unlike mkstemp, honours the umask
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise write_error(path, err) from err


def write_error(path: str | os.PathLike, err: OSError) -> OSError:
    """A one-line OSError naming `path` and the cause, in the errno's words: "could not write runs/a.ckpt: No space
    left on device (ENOSPC); the file there before, if any, is unchanged"."""
    cause = err.strerror or str(err)
    if err.errno in errno.errorcode:
        cause += f" ({errno.errorcode[err.errno]})"
    error = OSError(f"could not write {path}: {cause}; the file there before, if any, is unchanged")
    error.errno = err.errno  # not strerror / filename: OSError would then print those instead of the message
    return error


def torch_bytes(obj: object) -> bytes:
    """`torch.save` into memory, so that writing the file is a plain write whose errors carry an errno (torch's own
    file writer reports them without one)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def package_versions() -> dict[str, str]:
    """Installed versions of vision-lora, torch and timm, recorded with every file written."""
    out = {}
    for pkg in ("vision-lora", "torch", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def model_name(model: nn.Module) -> str:
    """The timm architecture name of `model` (`pretrained_cfg['architecture']`).

    Raises:
        VisionLoRAError: the model was not created by `timm.create_model`.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "architecture" not in cfg:
        raise VisionLoRAError(
            "The model has no timm pretrained_cfg['architecture']; create it with timm.create_model "
            "(or give the timm model name explicitly)."
        )
    return cfg["architecture"]


def load_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file.

    Raises:
        FileNotFoundError: the file is missing.
        VisionLoRAError: the file is not a complete safetensors file (truncated, another format, a pickle).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise VisionLoRAError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or in another format "
            f"(a pickled .bin is not read: convert it with safetensors first)."
        ) from None
