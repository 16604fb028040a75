"""Apply LoRA to a timm model (wrap the targets, freeze the rest, report), merge it back, or remove it."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import VisionLoRAError
from .config import LoRAConfig, LoRAReport, LoRAReportRow
from .layers import LoRAConv2d, LoRALayer, LoRALinear, LoRAQKVLinear, dora_norm
from .targets import classifier_names, fused_note, qkv_layout, resolve_with_skips

__all__ = [
    "apply_lora",
    "describe_targets",
    "lora_layers",
    "lora_report",
    "mark_trainable",
    "merge_lora",
    "remove_lora",
    "trainable_names",
]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers of `model` by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _wrap(model: nn.Module, name: str, config: LoRAConfig) -> LoRALayer:
    module = model.get_submodule(name)
    r, alpha = config.rank_and_alpha(name)
    args = (module, r, alpha, config.lora_dropout, config.use_rslora)
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d(*args, use_dora=config.use_dora)
    layout = qkv_layout(model, name) if config.qkv_slices != "fused" else None
    if layout is not None:
        return LoRAQKVLinear(*args, slices=config.qkv_slices, layout=layout, use_dora=config.use_dora)
    return LoRALinear(*args, use_dora=config.use_dora)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, nn.modules.normalization.RMSNorm)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORM_TYPES) or "Norm" in type(m).__name__


def trainable_names(model: nn.Module, config: LoRAConfig) -> set[str]:
    """Names of the parameters that train under `config`: every `lora_*` parameter, the classifier head, and the
    biases / norm layers the config asks for. Freezing and adapter files both follow this one rule."""
    heads = classifier_names(model)
    adapted = set(lora_layers(model))
    norm_prefixes = {n for n, m in model.named_modules() if _is_norm(m) and not isinstance(m, LoRALayer)}
    names = set()
    for n, _ in model.named_parameters():
        module, _, leaf = n.rpartition(".")
        if "lora_" in n or any(n.startswith(h + ".") for h in heads):
            names.add(n)
        elif leaf == "bias" and (
            config.bias == "all" or (config.bias == "lora_only" and module.removesuffix(".base_layer") in adapted)
        ):
            names.add(n)
        elif config.train_norm and module in norm_prefixes:
            names.add(n)
    return names


def _train_keeps_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return super(type(self), self).train(False)


_FROZEN_NORM_CLASSES: dict[type, type] = {}


def _freeze_norm_stats(m: _BatchNorm) -> None:
    """Keep a frozen BatchNorm in eval mode whatever `model.train()` says, so its running statistics never move.

    The class is swapped for a subclass that only overrides `train`: state-dict keys and forward are unchanged, and
    `merge_lora` swaps the original class back.
    """
    cls = type(m)
    if cls not in _FROZEN_NORM_CLASSES:
        _FROZEN_NORM_CLASSES[cls] = type(f"Frozen{cls.__name__}", (cls,), {"train": _train_keeps_eval})
    m.__class__ = _FROZEN_NORM_CLASSES[cls]
    m.train(False)


def _restore_norm_classes(model: nn.Module) -> None:
    frozen = set(_FROZEN_NORM_CLASSES.values())
    for m in model.modules():
        if type(m) in frozen:
            m.__class__ = type(m).__bases__[0]


def mark_trainable(model: nn.Module, config: LoRAConfig) -> None:
    """Set `requires_grad` from `trainable_names` and pin the statistics of every frozen BatchNorm."""
    names = trainable_names(model, config)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    _restore_norm_classes(model)
    if not config.train_norm:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                _freeze_norm_stats(m)


def lora_report(model: nn.Module) -> LoRAReport:
    """The report of the LoRA layers of `model`: one row per adapted module, trainable / total parameters."""
    rows = []
    for name, layer in lora_layers(model).items():
        w = layer.base_layer.weight
        rows.append(
            LoRAReportRow(
                name=name,
                kind=layer.kind,
                in_features=w.shape[1],
                out_features=w.shape[0],
                rank=layer.r,
                params=sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n),
                note="" if isinstance(layer, LoRAQKVLinear) else fused_note(name),
            )
        )
    return LoRAReport(
        rows=rows,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> LoRAReport:
    """Wrap the modules of `model` that `config.target_modules` selects with LoRA layers and freeze everything but
    the LoRA parameters, the classifier head and what the config adds. The model is changed in place.

    Returns:
        The report of adapted modules and parameter counts; `str(report)` is a printable table.

    Raises:
        VisionLoRAError: LoRA is already applied, a target matches nothing or a module LoRA cannot adapt, or the rank
            does not fit a target. Nothing is changed when this is raised.
    """
    config = config or LoRAConfig()
    if lora_layers(model):
        raise VisionLoRAError(
            "LoRA is already applied to this model; merge_lora(model) first or start from the base model."
        )
    targets, skipped, preset_only = resolve_with_skips(model, config)
    if config.use_dora:  # an overflowing norm is the user's to fix, not a target for the preset to skip
        for name in targets:
            try:
                dora_norm(model.get_submodule(name).weight)
            except ValueError as err:
                raise VisionLoRAError(f"Cannot adapt '{name}': {err}") from None
    layers = {}
    for name in targets:
        try:
            layers[name] = _wrap(model, name, config)
        except ValueError as err:
            if name not in preset_only:
                raise VisionLoRAError(f"Cannot adapt '{name}': {err}") from None
            skipped.append((name, str(err).rstrip(".")))
    if not layers:
        raise VisionLoRAError(
            f"No module of {type(model).__name__} can take LoRA with r={config.r}: "
            + "; ".join(f"{n}: {why}" for n, why in skipped[:5])
        )
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    skipped.sort(key=lambda item: position[item[0]])
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    model.lora_config = config
    mark_trainable(model, config)
    report = lora_report(model)
    report.skipped = skipped
    return report


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its base weight and put the original modules back, in place.

    Returns:
        The plain timm model: original module classes, original state-dict keys, all parameters trainable.
    """
    for layer in lora_layers(model).values():
        layer.merge()
    return remove_lora(model)


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original modules back without merging (their weights as they are), in place: the inverse of
    `apply_lora` for a model whose adapter is discarded.

    Returns:
        The model: original module classes, original state-dict keys, all parameters trainable.
    """
    for name, layer in lora_layers(model).items():
        _set_submodule(model, name, layer.base_layer)
    _restore_norm_classes(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


# ------------------------------------------------------------------------------------------------ listing targets


def describe_targets(model_name: str, config: LoRAConfig | None = None, **lora_args) -> str:
    """What `config` (or a LoRAConfig made of `lora_args`; default preset:auto) adapts in the timm model
    `model_name`, and what its preset skips, as the printable report table. Nothing is trained or downloaded: the
    model is built with random weights, on the meta device where timm allows it.

    Raises:
        VisionLoRAError: the config selects nothing adaptable or names a module LoRA cannot adapt.
    """
    import timm
    import torch

    if config is None:
        fields = LoRAConfig.__dataclass_fields__
        config = LoRAConfig(**{k: v for k, v in lora_args.items() if k in fields and v is not None})
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False)
    except Exception:  # a few models compute buffers from values at creation; build those for real
        model = timm.create_model(model_name, pretrained=False)
    report = apply_lora(model, config)
    heads = ", ".join(classifier_names(model)) or "none"
    what = config.target_modules or "preset:auto"
    return f"{model_name}: LoRA targets of {what} (classifier head, trained in full: {heads})\n{report}"
