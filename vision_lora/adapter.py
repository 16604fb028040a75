"""Adapter files (safetensors + JSON, never pickle) and merged plain-timm checkpoints; crash-safe writes."""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .inject import LoRAConfig, apply_lora, lora_layers, qkv_layout, trainable_names
from .layers import LoRAQKVLinear

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_state_dict",
    "atomic_write",
    "build_from_adapter",
    "load_adapter",
    "merged_state_dict",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
    "torch_bytes",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# 2: records `qkv_layouts`, the q/k/v rows of each fused projection. 1 (read, checked): q, k, v were row thirds.
_FORMAT = "vision_lora.adapter/2"
_FORMAT_V1 = "vision_lora.adapter/1"


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
        ValueError: the model was not created by `timm.create_model`.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "architecture" not in cfg:
        raise ValueError(
            "The model has no timm pretrained_cfg['architecture']; create it with timm.create_model "
            "(or give the timm model name explicitly)."
        )
    return cfg["architecture"]


def _lora_config(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("The model has no LoRA layers; call apply_lora(model, config) first.")
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
    model: nn.Module, directory: str | os.PathLike, class_names: list[str] | None = None, metadata: dict | None = None
) -> Path:
    """Write `adapter.safetensors` (LoRA + head weights only) and `adapter_config.json` into `directory`.

    Args:
        model: a model adapted by `apply_lora`.
        directory: created if missing.
        class_names: the label of each output index, kept with the adapter.
        metadata: extra JSON values to record, e.g. how the base weights were obtained.

    Returns:
        The directory.
    """
    config = _lora_config(model)
    directory = Path(directory)
    num_classes = int(getattr(model, "num_classes", 0))
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a head with {num_classes} classes.")
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
        raise ValueError("The LoRA layers are merged; unmerge them before saving an adapter.")
    state = adapter_state_dict(model)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"Refusing to write an adapter to {directory}: {key} holds NaN or infinite values.")
    data = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))
    text = json.dumps(info, indent=2, ensure_ascii=False)
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The JSON config of an adapter directory.

    Raises:
        FileNotFoundError: the directory lacks the adapter files.
        ValueError: the JSON is not a vision_lora adapter config.
    """
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; is {directory} an adapter directory?")
    info = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(info, dict) or info.get("format") not in (_FORMAT, _FORMAT_V1):
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not a vision_lora adapter config.")
    return info


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the adapter in `directory` to the base model `model` (in place) and load its weights.

    Raises:
        ValueError: the adapter was trained on another backbone or head size, the model already has LoRA, or the
            weights file does not match the adapter config.
    """
    info = read_adapter_config(directory)
    name = model_name(model)
    if info["model_name"] != name:
        raise ValueError(f"The adapter in {directory} was trained on {info['model_name']!r}, not {name!r}.")
    num_classes = int(getattr(model, "num_classes", 0))
    if info["num_classes"] != num_classes:
        raise ValueError(
            f"The adapter in {directory} has a {info['num_classes']}-class head but the model has {num_classes}; "
            f"create the model with num_classes={info['num_classes']}."
        )
    _check_qkv_layouts(model, info, directory)
    config = LoRAConfig(**{**info["lora_config"], "target_modules": info["adapted_modules"], "exclude_modules": []})
    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    apply_lora(model, config)
    model.lora_config = LoRAConfig(**info["lora_config"])
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.load_state_dict(state, strict=False)
    return model


def _check_qkv_layouts(model: nn.Module, info: dict, directory: str | os.PathLike) -> None:
    """Refuse an adapter whose fused-qkv updates would land on other rows than the ones it was trained on.

    Format 1 files took the q, k, v slices of every Linear named `qkv` with 3·d outputs as row thirds; that is right
    only where the attention lays its projection out as [all q | all k | all v].
    """
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
                raise ValueError(
                    f"The adapter in {directory} was saved by an older vision_lora ({_FORMAT_V1}) that took the q, k "
                    f"and v rows of '{name}' as row thirds, but {type(modules[name.rpartition('.')[0]]).__name__} "
                    f"lays them out as {layout or 'an unknown layout'}: its updates would land on the wrong rows. "
                    f"Retrain the adapter with this version."
                )
        elif recorded.get(name) != now:
            raise ValueError(
                f"The adapter in {directory} adapts '{name}' with q/k/v layout {recorded.get(name)}, but this model's "
                f"'{name}' has layout {now}; it was trained on another timm version or model definition."
            )


def build_from_adapter(directory: str | os.PathLike) -> nn.Module:
    """The adapted model of an adapter directory written by `vision-lora fit`: the base model rebuilt from the
    backbone and weight source the adapter records (see `create_backbone`), with the adapter loaded.

    Raises:
        ValueError: the recorded weights cannot be loaded here (e.g. hub weights offline).
    """
    from .weights import create_backbone

    info = read_adapter_config(directory)
    model = create_backbone(info["model_name"], num_classes=info["num_classes"], weights=info.get("weights", "random"))
    return load_adapter(model, directory)


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
