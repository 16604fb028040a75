"""Grad-CAM class-activation maps of a trained classifier (LoRA-adapted or not), with a forward hook and
`torch.autograd.grad`: no parameter gradient is touched and the model's mode is the caller's; and `vision-lora explain`,
which writes an overlay per image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import VisionLoRAError

__all__ = ["cam_layer", "explain", "grad_cam", "overlay"]


def cam_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads: `name`, else a ViT's last `blocks[-1].norm1`, else the last feature stage timm names
    (`feature_info`). A LoRA layer is read as its wrapper (its `base_layer` does not run unless merged).

    Raises:
        VisionLoRAError: `name` is not a module of `model`, or names a `base_layer`.
    """
    if name is None:
        if hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.blocks[-1], "norm1"):
            name = f"blocks.{len(model.blocks) - 1}.norm1"
        else:
            info = getattr(model, "feature_info", None)
            if not info:
                raise VisionLoRAError("This model names no feature stage; give --layer, the module to read.")
            name = info[-1]["module"]
    if name.split(".")[-1] == "base_layer":
        raise VisionLoRAError(f"{name} is a LoRA base layer, which does not run unless merged; name its wrapper.")
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise VisionLoRAError(f"{name!r} is not a module of the model; see print(model).") from None


def _as_grid(activation: Tensor, model: nn.Module, size: tuple[int, int]) -> Tensor:
    """(B, C, h, w) from a conv map, or from ViT tokens (B, N, C) without the prefix tokens on the patch grid (of an
    input of `size` where the ViT takes any size)."""
    if activation.ndim == 4:
        return activation
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    embed = model.patch_embed
    h, w = embed.dynamic_feat_size(size) if getattr(model, "dynamic_img_size", False) else embed.grid_size
    tokens = activation[:, prefix:, :]  # (B, h*w, C)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)  # (B, C, h, w)


def grad_cam(model: nn.Module, images: Tensor, classes: Tensor | None = None, layer: str | None = None) -> Tensor:
    """Grad-CAM maps of `images` for `classes` (default: each image's top class).

    Run it on an evaluation copy, not on the module being trained: the forward pass runs in the model's current mode.

    Args:
        model: a timm classifier returning logits.
        images: (N, 3, H, W) preprocessed.
        classes: (N,) the class to explain for each image.
        layer: the module to read (`cam_layer`).

    Returns:
        (N, H, W) maps in [0, 1] (each image scaled by its maximum; all zeros where nothing is positive).
    """
    _, module = cam_layer(model, layer)
    kept: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        if not out.requires_grad:  # nothing upstream trains: the map's gradient starts here
            out = out.detach().requires_grad_(True)
        kept.append(out)
        return out

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(False)
            logits = model(x)  # (N, K)
            activation = kept[-1]
            chosen = logits.argmax(-1) if classes is None else classes.to(logits.device)
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    size = tuple(images.shape[-2:])
    act, grad = _as_grid(activation.detach(), model, size), _as_grid(grads, model, size)  # (N, C, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    cam = F.relu((weights * act).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
    peak = cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).float()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: `image` (H, W, 3 uint8) with the (H, W) map in [0, 1] blended over it in the jet colours."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]  # (H, W, 3) in [0, 1]
    blended = (1 - alpha) * image.astype(np.float64) / 255 + alpha * heat
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def explain(
    ckpt_path: str | None = None,
    adapter: str | None = None,
    images: str | None = None,
    output: str = "explain",
    layer: str | None = None,
    limit: int = 64,
) -> None:
    """Write a Grad-CAM overlay of each image (for its top class; multi-label: its top-scoring class) to `output`.

    Args:
        ckpt_path: a checkpoint written by `vision-lora fit`.
        adapter: an adapter directory written by `vision-lora fit` (instead of `ckpt_path`).
        images: a folder of images (searched recursively) or one image.
        output: the folder the overlays are written to (`<path under images, / as __>.cam.png`).
        layer: the module to read; default a ViT's `blocks[-1].norm1`, else the last feature stage.
        limit: at most this many images.
    """
    from PIL import Image

    from .checkpoint import load_model
    from .data.folder import image_files, readable_files
    from .reports import _to_uint8

    if images is None:
        raise VisionLoRAError("vision-lora explain needs --images, a folder of images or one image.")
    trained = load_model(ckpt_path=ckpt_path, adapter=adapter)
    found = image_files(images, limit)
    kept, batch = readable_files(found, trained.data_config)
    paths = [found[i] for i in kept]
    names = trained.class_names or [str(i) for i in range(trained.model.num_classes)]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = trained.data_config
    for start in range(0, len(paths), 16):
        chunk = batch[start : start + 16]
        maps = grad_cam(trained.model, chunk, layer=layer).numpy()
        with torch.no_grad():
            top = trained.model(chunk).argmax(-1).tolist()
        for j, cam in enumerate(maps):
            path = paths[start + j]
            picture = overlay(_to_uint8(chunk[j], cfg["mean"], cfg["std"]), cam)
            relative = Path(path).relative_to(images) if Path(images).is_dir() else Path(Path(path).name)
            target = out / ("__".join(relative.with_suffix("").parts) + ".cam.png")
            Image.fromarray(picture).save(target)
            print(f"{path}\t{names[top[j]]}\t{os.fspath(target)}")
