"""Adapter files: vision_lora's own (safetensors + JSON, never pickle) and, through `peft_format`, Hugging Face
PEFT's; merged plain-timm checkpoints."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .._io import atomic_write, load_safetensors, model_name, package_versions, torch_bytes
from ..errors import VisionLoRAError
from . import peft_format
from .config import LoRAConfig
from .inject import apply_lora, lora_layers, remove_lora, trainable_names
from .layers import LoRAQKVLinear
from .targets import qkv_layout

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_state_dict",
    "load_adapter",
    "merged_state_dict",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# 2: records `qkv_layouts`, the q/k/v rows of each fused projection. 1 (read, checked): q, k, v were row thirds.
_FORMAT = "vision_lora.adapter/2"
_FORMAT_V1 = "vision_lora.adapter/1"
FORMATS = ("vision_lora", "peft")


def _lora_config(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise VisionLoRAError("The model has no LoRA layers; call apply_lora(model, config) first.")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What an adapter holds: every trained parameter (LoRA, head, and the biases / norms the config trains), plus
    the running statistics of norm layers that train."""
    config = _lora_config(model)
    names = trainable_names(model, config)
    state = model.state_dict()
    out = {n: state[n] for n in names}
    if config.train_norm:
        norm_modules = {n.rpartition(".")[0] for n in names if "lora_" not in n}
        out.update({n: b for n, b in model.named_buffers() if n.rpartition(".")[0] in norm_modules and n in state})
    return {n: t.detach().contiguous().cpu() for n, t in sorted(out.items())}


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    class_names: list[str] | None = None,
    metadata: dict | None = None,
    format: str = "vision_lora",  # noqa: A002 - PEFT and the CLI call it format
) -> Path:
    """Write the adapter of `model` (LoRA + head weights only) into `directory`.

    Args:
        model: a model adapted by `apply_lora` (or `load_adapter`).
        directory: created if missing.
        class_names: the label of each output index, kept with a vision_lora adapter (PEFT's format has no place
            for them).
        metadata: extra JSON values to record with a vision_lora adapter, e.g. how the base weights were obtained.
        format: "vision_lora" (`adapter.safetensors` + `adapter_config.json`) or "peft" (`adapter_model.safetensors`
            + `adapter_config.json` that `peft.PeftModel.from_pretrained` loads onto the timm model; see
            `peft_format.save_peft_adapter`).

    Returns:
        The directory.

    Raises:
        VisionLoRAError: the model has no (unmerged) LoRA, a weight is not finite, or (PEFT) the adapter has no exact
            PEFT equivalent.
    """
    if format not in FORMATS:
        raise VisionLoRAError(f"format must be one of {FORMATS}, got {format!r}.")
    if format == "peft":
        return peft_format.save_peft_adapter(model, directory)
    config = _lora_config(model)
    directory = Path(directory)
    num_classes = int(getattr(model, "num_classes", 0))
    if class_names is not None and len(class_names) != num_classes:
        raise VisionLoRAError(f"{len(class_names)} class names given for a head with {num_classes} classes.")
    layers = lora_layers(model)
    info = {
        "format": _FORMAT,
        "model_name": model_name(model),
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "lora_config": config.to_dict(),
        "adapted_modules": list(layers),
        "qkv_layouts": {n: asdict(m.layout) for n, m in layers.items() if isinstance(m, LoRAQKVLinear)},
        "merged": any(layer.merged for layer in layers.values()),
        "versions": package_versions(),
        **(metadata or {}),
    }
    if info["merged"]:
        raise VisionLoRAError("The LoRA layers are merged; unmerge them before saving an adapter.")
    state = adapter_state_dict(model)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise VisionLoRAError(f"Refusing to write an adapter to {directory}: {key} holds NaN or infinite values.")
    data = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))
    text = json.dumps(info, indent=2, ensure_ascii=False)
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The JSON config of a vision_lora adapter directory.

    Raises:
        FileNotFoundError: the directory lacks the adapter files.
        VisionLoRAError: the JSON is not a vision_lora adapter config (a PEFT adapter's is named as such).
    """
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            if name == ADAPTER_WEIGHTS and peft_format.is_peft_adapter(directory):
                raise VisionLoRAError(
                    f"{directory} holds a PEFT adapter; load it onto its base model with load_adapter(model, dir) "
                    f"(CLI: --model.backbone <timm name> --model.init_adapter {directory})."
                )
            raise FileNotFoundError(f"{directory / name} not found; is {directory} an adapter directory?")
    try:
        info = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VisionLoRAError(f"{directory / ADAPTER_CONFIG} is not valid JSON ({err}).") from None
    if not isinstance(info, dict) or info.get("format") not in (_FORMAT, _FORMAT_V1):
        raise VisionLoRAError(f"{directory / ADAPTER_CONFIG} is not a vision_lora adapter config.")
    return info


def load_adapter(model: nn.Module, directory: str | os.PathLike, info: dict | None = None) -> nn.Module:
    """Apply the adapter in `directory` to the base model `model` (in place) and load its weights: a vision_lora
    adapter, or a PEFT LoRA / DoRA adapter of the same timm model (see `peft_format.load_peft_adapter`).

    Args:
        model: the base model.
        directory: the adapter directory.
        info: the vision_lora adapter config of `directory` when the caller has read it (`read_adapter_config`).

    Raises:
        VisionLoRAError: the adapter was trained on another backbone or head size, the model already has LoRA, or the
            weights file does not match the adapter config; the model is unchanged then.
    """
    if info is None:
        if peft_format.is_peft_adapter(directory):
            return peft_format.load_peft_adapter(model, directory)
        info = read_adapter_config(directory)
    name = model_name(model)
    if info["model_name"] != name:
        raise VisionLoRAError(f"The adapter in {directory} was trained on {info['model_name']!r}, not {name!r}.")
    num_classes = int(getattr(model, "num_classes", 0))
    if info["num_classes"] != num_classes:
        raise VisionLoRAError(
            f"The adapter in {directory} has a {info['num_classes']}-class head but the model has {num_classes}; "
            f"create the model with num_classes={info['num_classes']}."
        )
    _check_qkv_layouts(model, info, directory)
    recorded = LoRAConfig.from_dict(info["lora_config"])
    # Exactly the recorded modules, whatever the patterns would select in this timm version.
    exact = [f"re:{re.escape(n)}" for n in info["adapted_modules"]]
    config = LoRAConfig.from_dict({**info["lora_config"], "target_modules": exact, "exclude_modules": []})
    state = load_safetensors(Path(directory) / ADAPTER_WEIGHTS)
    apply_lora(model, config)
    model.lora_config = recorded
    try:  # the LoRA layers come out again when the file does not fit them
        _check_state(model, state, Path(directory) / ADAPTER_WEIGHTS)
    except ValueError:
        remove_lora(model)
        raise
    model.load_state_dict(state, strict=False)
    return model


def _check_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = adapter_state_dict(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise VisionLoRAError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise VisionLoRAError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(expected[key].shape)}; the "
                f"adapter was written for another model or configuration."
            )


def _check_qkv_layouts(model: nn.Module, info: dict, directory: str | os.PathLike) -> None:
    """Refuse an adapter whose fused-qkv updates would land on other rows than the ones it was trained on.

    Format 1 files took the q, k, v slices of every Linear named `qkv` with 3·d outputs as row thirds; that is right
    only where the attention lays its projection out as [all q | all k | all v].
    """
    if info["lora_config"].get("qkv_slices") == "fused":  # one LoRA over every row: no layout to agree on
        return
    modules = dict(model.named_modules())
    recorded = info.get("qkv_layouts", {})
    for name in info["adapted_modules"]:
        module = modules.get(name)
        if module is None:
            continue  # reported by apply_lora as "matches no module"
        layout = qkv_layout(model, name)
        now = asdict(layout) if layout is not None else None
        if info["format"] == _FORMAT_V1:
            was_thirds = name.split(".")[-1] == "qkv" and isinstance(module, nn.Linear) and module.out_features % 3 == 0
            if was_thirds and (layout is None or not layout.is_thirds):
                raise VisionLoRAError(
                    f"The adapter in {directory} was saved by an older vision_lora ({_FORMAT_V1}) that took the q, k "
                    f"and v rows of '{name}' as row thirds, but {type(modules[name.rpartition('.')[0]]).__name__} "
                    f"lays them out as {layout or 'an unknown layout'}: its updates would land on the wrong rows. "
                    f"Retrain the adapter with this version."
                )
        elif recorded.get(name) != now:
            raise VisionLoRAError(
                f"The adapter in {directory} adapts '{name}' with q/k/v layout {recorded.get(name)}, but this model's "
                f"'{name}' has layout {now}; it was trained on another timm version or model definition."
            )


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain timm model with every LoRA update merged, without changing `model`."""
    state = model.state_dict()
    layers = lora_layers(model)
    renamed = {}
    for key, value in state.items():
        if "lora_" in key.rpartition(".")[2]:
            continue
        for name in layers:
            prefix = f"{name}.base_layer."
            if key.startswith(prefix):
                key = f"{name}.{key[len(prefix) :]}"
                break
        renamed[key] = value
    for name, layer in layers.items():
        renamed[f"{name}.weight"] = layer.merged_weight()
    return {k: v.detach().contiguous().cpu() for k, v in renamed.items()}


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the merged plain-timm state dict so that `timm.create_model(name, num_classes=N, checkpoint_path=path)`
    loads it without vision_lora. A `.safetensors` suffix writes safetensors, anything else a torch state dict."""
    path = Path(path)
    state = merged_state_dict(model)
    if path.suffix == ".safetensors":
        data = safetensors_bytes(state, metadata={"format": "pt"})
    else:
        data = torch_bytes(state)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path
