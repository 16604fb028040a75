"""Hugging Face PEFT's adapter format for timm models, both ways, exact to the logit.

A PEFT LoRA adapter is `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
DoRA's `.lora_magnitude_vector`, and the full tensors of `modules_to_save`) with `adapter_config.json`
(`peft.LoraConfig`). PEFT adapts a fused qkv projection as one Linear; vision_lora's per-slice qkv LoRA is exactly
such a LoRA of rank S·r: A = [A_q; A_v] stacked, B block-diagonal on the QKVLayout rows (zero rows for a slice not
adapted), its alpha chosen so that the scale stays s. DoRA's magnitude of a row that is not adapted is that row's
norm, so its scale is exactly 1.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers import Conv2dSame
from torch import Tensor, nn

from .._io import atomic_write, load_safetensors, model_name
from ..errors import VisionLoRAError
from .config import LoRAConfig
from .inject import apply_lora, lora_layers
from .layers import LoRAConv2d, LoRALayer, dora_norm
from .targets import classifier_names

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "is_peft_adapter", "load_peft_adapter", "save_peft_adapter"]

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

# LoraConfig fields whose PEFT default is what the conversion assumes; any other value is a feature we do not read.
_DEFAULTS = {
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
}


# ------------------------------------------------------------------------------------------------------------ write


def _peft_factors(name: str, layer: LoRALayer) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """(A, B, magnitude or None, lora_alpha) of the PEFT LoRA equal to `layer`: shapes as PEFT's lora_A / lora_B
    weights, the magnitude over every output row, alpha such that PEFT's scale is the layer's."""
    base = layer.base_layer
    if isinstance(base, Conv2dSame) and base.kernel_size != (1, 1):
        raise VisionLoRAError(
            f"'{name}' is a timm Conv2dSame ({base.kernel_size[0]}x{base.kernel_size[1]}, stride "
            f"{base.stride[0]}): PEFT runs its LoRA branch as a plain Conv2d with padding 0, so no PEFT adapter "
            f"computes what this one does. Leave it out (exclude_modules) to export to PEFT."
        )
    b, a = (t.detach() for t in layer._factors())  # (out, k), (k, fan_in)
    k = a.shape[0]
    if isinstance(layer, LoRAConv2d):
        a = a.reshape(k, *base.weight.shape[1:])  # (k, in, kh, kw)
        b = b.reshape(b.shape[0], k, 1, 1)  # (out, k, 1, 1)
    # PEFT's scale is alpha / k (alpha / sqrt(k) with rsLoRA); the layer's is `scaling`.
    alpha = layer.scaling * (math.sqrt(k) if layer.use_rslora else k)
    magnitude = None
    if layer.use_dora:
        rows = layer._dora_rows()
        magnitude = layer.lora_magnitude.detach()
        if rows is not None:  # a row DoRA does not adapt keeps W: its magnitude is its norm
            magnitude = dora_norm(base.weight).index_copy(0, rows, magnitude)
        if isinstance(layer, LoRAConv2d):
            magnitude = magnitude.view(1, -1, 1, 1)  # PEFT's conv magnitude shape
    return a, b, magnitude, alpha


def _peft_endswith_clash(model: nn.Module, heads: list[str]) -> str | None:
    """A module other than a head that PEFT's `modules_to_save` rule (the name ends with the entry) would also
    pick up, or None."""
    for name, _ in model.named_modules():
        inside = any(name == h or name.startswith(h + ".") for h in heads)
        if not inside and any(name.endswith(h) for h in heads):
            return name
    return None


def peft_state(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The PEFT adapter of a LoRA model: (tensors of `adapter_model.safetensors`, `adapter_config.json` values).

    Raises:
        VisionLoRAError: the model has no unmerged LoRA, or its adapter has no exact PEFT equivalent (the message says
            why).
    """
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if config is None or not layers:
        raise VisionLoRAError("The model has no LoRA layers; call apply_lora(model, config) first.")
    if any(layer.merged for layer in layers.values()):
        raise VisionLoRAError("The LoRA layers are merged; unmerge them before saving an adapter.")
    if config.bias != "none" or config.train_norm:
        what = f"bias={config.bias!r}" if config.bias != "none" else "train_norm=True"
        raise VisionLoRAError(
            f"This adapter trains {what}; its PEFT export would need those tensors in modules_to_save as whole "
            f"modules, which is not written. Train with bias='none' and train_norm=False to export to PEFT."
        )
    heads = classifier_names(model)
    clash = _peft_endswith_clash(model, heads)
    if clash is not None:
        raise VisionLoRAError(
            f"PEFT would also train and save '{clash}' as a module_to_save (its name ends with a head's name "
            f"{heads}); no exact PEFT config exists for this model's head."
        )
    uses_dora = {layer.use_dora for layer in layers.values()}
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(uses_dora) > 1 or len(rslora) > 1:
        raise VisionLoRAError("PEFT applies use_dora and use_rslora to every module alike; this adapter mixes them.")
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers.items():
        a, b, magnitude, alpha = _peft_factors(name, layer)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b
        if magnitude is not None:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude
        key = re.escape(name)  # PEFT reads pattern keys as regexes matched at the end of the module name
        if a.shape[0] != config.r:
            rank_pattern[key] = int(a.shape[0])
        if alpha != config.lora_alpha:
            alpha_pattern[key] = alpha
    state = model.state_dict()
    for head in heads:
        for key in model.get_submodule(head).state_dict():
            tensors[f"{_PREFIX}{head}.{key}"] = state[f"{head}.{key}"]
    values = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": model_name(model),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": rslora.pop(),
        "use_dora": uses_dora.pop(),
        "target_modules": list(layers),
        "exclude_modules": None,
        "modules_to_save": heads,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        **_DEFAULTS,
    }
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, values


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` in PEFT's format, so that
    `peft.PeftModel.from_pretrained(timm.create_model(name, num_classes=N), directory)` computes this model's logits.

    Every LoraConfig field that PEFT would otherwise default differently is written out. Per-slice qkv LoRA becomes
    a whole-qkv LoRA of rank S·r (via `rank_pattern` / `alpha_pattern`), the classifier head goes in
    `modules_to_save`.

    Raises:
        VisionLoRAError: see `peft_state`; nothing is written then.
    """
    tensors, values = peft_state(model)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise VisionLoRAError(
                f"Refusing to write a PEFT adapter to {directory}: {key} holds NaN or infinite values."
            )
    directory = Path(directory)
    atomic_write(directory / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(values, indent=2, sort_keys=True)
    atomic_write(directory / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


# ------------------------------------------------------------------------------------------------------------- read


def is_peft_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a PEFT adapter config (`adapter_config.json` with a `peft_type`)."""
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        return False
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(values, dict) and "peft_type" in values


def _read_config(directory: Path) -> dict:
    values = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    if values.get("peft_type") != "LORA":
        raise VisionLoRAError(f"{directory} is a PEFT {values.get('peft_type')} adapter; only LORA (and DoRA) is read.")
    for key, default in _DEFAULTS.items():
        if values.get(key, default) not in (default, None, False):
            raise VisionLoRAError(f"{directory}: PEFT's {key}={values[key]!r} is not supported by vision_lora.")
    if not (directory / PEFT_WEIGHTS).is_file():
        hint = (
            " (adapter_model.bin is a pickle, which is not read)" if (directory / "adapter_model.bin").exists() else ""
        )
        raise FileNotFoundError(f"{directory / PEFT_WEIGHTS} not found{hint}.")
    return values


def _base_name(name_or_path: str | None) -> str | None:
    """The timm architecture of PEFT's `base_model_name_or_path` ("timm/vit_small_patch16_224.augreg_in21k" ->
    "vit_small_patch16_224"), or None when it does not name one."""
    if not name_or_path:
        return None
    name = name_or_path.removeprefix("hf-hub:").removeprefix("hf_hub:").removeprefix("timm/")
    if "/" in name or os.sep in name:
        return None
    return name.split(".")[0]


def _peft_matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's target rule: a string is a full-match regex, a list entry matches the name or its dotted end."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _closest(name: str, candidates: list[str]) -> str:
    """The module names (or last name parts, as PEFT's list entries usually are) most like `name`."""
    if "." not in name:
        candidates = sorted({c.rpartition(".")[2] for c in candidates})
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.3)
    return ", ".join(close) if close else ", ".join(candidates[:3])


def _split_keys(directory: Path, tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """({module: {lora_A.weight / lora_B.weight / lora_magnitude_vector: tensor}}, {model state key: tensor})."""
    lora: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            raise VisionLoRAError(f"{directory / PEFT_WEIGHTS}: key {key!r} does not start with {_PREFIX!r}.")
        key = key[len(_PREFIX) :]
        part = next((p for p in _LORA_KEYS if key.endswith("." + p)), None)
        if part is not None:
            lora.setdefault(key[: -len(part) - 1], {})[part] = value
        elif "lora_" in key:
            feature = "LoRA on an embedding" if "lora_embedding" in key else f"the tensor {key!r}"
            raise VisionLoRAError(f"{directory}: {feature} is a PEFT feature vision_lora does not read.")
        else:
            other[key] = value
    return lora, other


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild the PEFT LoRA / DoRA adapter in `directory` in vision_lora's layers on the base model `model`, in
    place, so that the model computes PEFT's logits.

    Read: LoRA on Linear (a fused qkv as one LoRA over the whole projection) and Conv2d, rsLoRA, DoRA,
    `rank_pattern` / `alpha_pattern`, the classifier head in `modules_to_save`. The backbone is the model given; when
    the config names one (`base_model_name_or_path`) it must be the same timm architecture, and every tensor must
    have the model's shape.

    Raises:
        VisionLoRAError: another PEFT type or feature, a target or shape that does not fit the model, a head that is not
            in the file, or a weights file that is not safetensors; the model is unchanged then.
        FileNotFoundError: the weights file is missing.
    """
    directory = Path(directory)
    values = _read_config(directory)
    arch, recorded = model_name(model), _base_name(values.get("base_model_name_or_path"))
    if recorded is not None and recorded != arch:
        raise VisionLoRAError(
            f"The PEFT adapter in {directory} was trained on {values['base_model_name_or_path']!r}, the model is "
            f"{arch!r}; create the model it was trained on."
        )
    tensors = load_safetensors(directory / PEFT_WEIGHTS)
    lora, other = _split_keys(directory, tensors)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    targets = values.get("target_modules")
    if targets:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        for pattern in patterns:
            if not any(_peft_matches(n, [pattern] if not isinstance(targets, str) else pattern) for n in names):
                raise VisionLoRAError(
                    f"PEFT target_modules entry {pattern!r} of {directory} matches no module of {arch}; closest: "
                    f"{_closest(pattern, names)}. Is this adapter for another backbone?"
                )
    for name in lora:
        if name not in modules:
            raise VisionLoRAError(
                f"{directory} adapts {name!r}, which {arch} does not have (closest: {_closest(name, names)})."
            )
        base = modules[name]
        if type(base) not in (nn.Linear, nn.Conv2d, Conv2dSame):
            raise VisionLoRAError(
                f"{directory} adapts {name!r}, a {type(base).__name__}; vision_lora reads Linear / Conv2d."
            )
        if isinstance(base, Conv2dSame) and base.kernel_size != (1, 1):
            raise VisionLoRAError(
                f"{directory} adapts {name!r}, a timm Conv2dSame with a {base.kernel_size[0]}x{base.kernel_size[1]} "
                f"kernel, whose LoRA branch PEFT runs without the same-padding: its outputs cannot be reproduced."
            )

    use_dora, use_rslora = bool(values.get("use_dora")), bool(values.get("use_rslora"))
    r, alpha = int(values["r"]), float(values["lora_alpha"])
    patterns = LoRAConfig(
        r=r,
        lora_alpha=alpha,
        rank_pattern=values.get("rank_pattern") or {},
        alpha_pattern=values.get("alpha_pattern") or {},
    )
    rank_pattern, alpha_pattern = {}, {}
    for name, parts in lora.items():
        rank, module_alpha = patterns.rank_and_alpha(name)
        base = modules[name]
        w = base.weight
        conv = w.dim() == 4
        expect = {
            "lora_A.weight": (rank, *w.shape[1:]),  # (k, in) or (k, in, kh, kw)
            "lora_B.weight": (w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank),
        }
        if use_dora:
            expect["lora_magnitude_vector"] = (1, w.shape[0], 1, 1) if conv else (w.shape[0],)
        for part, shape in expect.items():
            if part not in parts:
                raise VisionLoRAError(f"{directory / PEFT_WEIGHTS} lacks {_PREFIX}{name}.{part}.")
            if tuple(parts[part].shape) != shape:
                raise VisionLoRAError(
                    f"{directory / PEFT_WEIGHTS}: {_PREFIX}{name}.{part} has shape {tuple(parts[part].shape)}, the "
                    f"model and config give {shape}. Is this adapter for another backbone?"
                )
        if rank != r:
            rank_pattern[re.escape(name)] = rank
        if module_alpha != alpha:
            alpha_pattern[re.escape(name)] = module_alpha
    if not lora:
        raise VisionLoRAError(f"{directory / PEFT_WEIGHTS} holds no LoRA tensors.")

    heads = classifier_names(model)
    saved = values.get("modules_to_save") or []
    state = model.state_dict()
    for key, value in other.items():
        if not any(key.startswith(h + ".") for h in heads):
            raise VisionLoRAError(
                f"{directory} saves {key!r} in full (modules_to_save {saved}); vision_lora reads only the classifier "
                f"head {heads} there."
            )
        if key not in state:
            raise VisionLoRAError(f"{directory / PEFT_WEIGHTS}: {_PREFIX}{key} is not a tensor of {arch}'s head.")
        if value.shape != state[key].shape:
            num_classes = int(getattr(model, "num_classes", 0))
            raise VisionLoRAError(
                f"{directory / PEFT_WEIGHTS}: {_PREFIX}{key} has shape {tuple(value.shape)}, the model's "
                f"{tuple(state[key].shape)} (a {num_classes}-class head); create the model with the adapter's class "
                f"count (num_classes={value.shape[0]}) and backbone."
            )
    missing = [f"{h}.{k}" for h in heads for k in model.get_submodule(h).state_dict() if f"{h}.{k}" not in other]
    if missing:
        raise VisionLoRAError(
            f"The PEFT adapter in {directory} has no classifier head ({missing[0]} is not in the file; "
            f"modules_to_save={saved}): its logits depend on a random head. Train it with modules_to_save={heads}."
        )

    config = LoRAConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(values.get("lora_dropout") or 0.0),
        target_modules=[f"re:{re.escape(n)}" for n in lora],
        qkv_slices="fused",
        use_rslora=use_rslora,
        use_dora=use_dora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    apply_lora(model, config)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, parts in lora.items():
            layer = layers[name]
            layer.lora_A.copy_(parts["lora_A.weight"].view_as(layer.lora_A))
            layer.lora_B.copy_(parts["lora_B.weight"].view_as(layer.lora_B))
            if use_dora:
                layer.lora_magnitude.copy_(parts["lora_magnitude_vector"].view_as(layer.lora_magnitude))
        for key, value in other.items():
            state[key].copy_(value)  # state-dict tensors share the storage of the head's parameters and buffers
    return model
