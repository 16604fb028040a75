"""Where LoRA goes in a timm model: family presets, the structural preset, the qkv layout table, classifier names,
and target resolution (patterns → module names, with the reason each refused module cannot take LoRA)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable

from timm.layers import Conv2dSame
from torch import nn

from ..errors import VisionLoRAError
from .config import LoRAConfig
from .kernels import QKVLayout
from .layers import LoRALayer

__all__ = ["PRESETS", "classifier_names", "qkv_layout", "resolve_targets"]

_SUPPORTED = (nn.Linear, nn.Conv2d, Conv2dSame)


def _is_pointwise_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def _attention_preset(model: nn.Module) -> list[str]:
    """Every attention input projection: the fused qkv (ViT, DeiT, BEiT, Swin) or separate q / k / v (EVA-02)."""
    return list(_attention_projections(model))


def _convnext_preset(model: nn.Module) -> list[str]:
    """The channel-MLP layers of every ConvNeXt block, Linear or 1×1 conv."""
    return [
        n
        for n, m in model.named_modules()
        if re.search(r"\.mlp\.fc[12]$", n) and (isinstance(m, nn.Linear) or _is_pointwise_conv(m))
    ]


def _pointwise_preset(model: nn.Module) -> list[str]:
    """Every 1×1 conv (expansion, projection, head conv of EfficientNet / MobileNet), squeeze-excite gates excepted."""
    return [n for n, m in model.named_modules() if _is_pointwise_conv(m) and ".se." not in f".{n}."]


def _resnet_preset(model: nn.Module) -> list[str]:
    """The 1×1 convs of each residual block (bottleneck conv1/conv3, downsample); a block with none (BasicBlock)
    contributes its k×k convs instead."""
    names = []
    for block_name, block in model.named_modules():
        if not re.fullmatch(r"layer\d+\.\d+", block_name):
            continue
        convs = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and n]
        own = [(n, m) for n, m in convs if not n.startswith("downsample")]
        if any(_is_pointwise_conv(m) for _, m in own):
            convs = [(n, m) for n, m in convs if _is_pointwise_conv(m)]
        names += [f"{block_name}.{n}" for n, _ in convs]
    return names


# Names an attention module gives its input projections, and the class names of attention modules.
_PROJ_NAMES = frozenset(
    "qkv q k v kv qk qkvs q_proj k_proj v_proj qkv_proj to_q to_k to_v to_qkv query key value to_query to_key "
    "to_value".split()
)
_ATTENTION_CLASS = re.compile(r"Attn|Attention|MHSA|XCA|GPSA|MLA|LambdaLayer", re.IGNORECASE)
# Channel gates inside a block (squeeze-excite and relatives): tiny bottlenecks, not the block's channel mixing.
_GATE_CLASS = re.compile(
    r"^(SEModule|SqueezeExcite|EffectiveSEModule|SEBlock|SqueezeExcitation|EcaModule|CecaModule|CbamModule|"
    r"LightCbamModule|ChannelAttn|LightChannelAttn|SpatialAttn|SelectiveKernelAttn|SplitAttn|CoordAttn|"
    r"GlobalContext|GatherExcite|NonLocalAttn|BatNonLocalAttn)$"
)


def _attention_projections(model: nn.Module) -> dict[str, str]:
    """Input projections of every attention module: {projection name: attention module name}.

    A projection is a Linear or 1×1 conv named like q / k / v / kv / qk / qkv (directly, or inside a norm wrapper such
    as LeViT's `qkv.linear` or a list such as `qkvs.0.conv`) whose owner within three levels up is an attention class,
    or whose fused layout is known (`qkv_layout`).
    """
    modules = dict(model.named_modules())
    out = {}
    for name, m in modules.items():
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))):
            continue
        parts = name.split(".")
        for depth in (1, 2, 3):
            if len(parts) <= depth:
                break
            if parts[-depth] not in _PROJ_NAMES:
                continue
            owner = ".".join(parts[:-depth])
            if _ATTENTION_CLASS.search(type(modules[owner]).__name__) or qkv_layout(model, name) is not None:
                out[name] = owner
                break
    return out


def _blocks(model: nn.Module) -> list[str]:
    """Names of the repeated units of `model`: the items of a Sequential / ModuleList whose items have children
    (timm stages and blocks), deepest last."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and any(True for c in m.children() if any(c.children())):
            names += [f"{name}.{child}" if name else child for child, _ in m.named_children()]
    return names


def _block_of(name: str, blocks: list[str]) -> str:
    """The deepest block containing module `name` ("" when none does)."""
    best = ""
    for b in blocks:
        if (name == b or name.startswith(b + ".")) and len(b) > len(best):
            best = b
    return best


def _structural_preset(model: nn.Module) -> list[str]:
    """Targets decided from the model's structure, for any family.

    Each block (a unit of a stage list) that holds attention contributes the attention's input projections; a block
    without attention contributes its channel-mixing layers (Linears and 1×1 convs, squeeze-excite gates left out),
    or, when it has none, its dense k×k convs (ResNet basic blocks). Layers outside any block contribute Linears and
    1×1 convs. Squeeze-excite gates only when nothing else is a plain Linear / conv (NFNet's convs are weight-
    standardised). Never the classifier head nor a conv reading the input image (the stem).
    """
    modules = dict(model.named_modules())
    attention = _attention_projections(model)
    blocks = _blocks(model)
    # An attention block: the module holding an attention module (its MLP and norms are that block's too).
    attn_blocks = {o.rpartition(".")[0] or o for o in attention.values()}
    in_chans = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0]
    heads = classifier_names(model)
    by_block: dict[str, list[str]] = {}
    kxk: dict[str, list[str]] = {}
    gates: list[str] = []
    for name, m in modules.items():
        if type(m) not in _SUPPORTED or name in attention:  # subclasses (weight-standardised convs) change the math
            continue
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        parent = name.rpartition(".")[0]
        if any(_GATE_CLASS.search(type(modules[a]).__name__) for a in (parent, parent.rpartition(".")[0])):
            gates.append(name)
            continue
        block = _block_of(name, blocks)
        if any(name.startswith(a + ".") for a in attn_blocks):
            continue
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            if m.in_channels != in_chans and block and not re.search("stem|patch_embed", name.split(".")[0]):
                kxk.setdefault(block, []).append(name)
            continue
        by_block.setdefault(block, []).append(name)
    picked = set(attention)
    for names in by_block.values():
        picked.update(names)
    shortcut = re.compile(r"(^|\.)(downsample|shortcut|skip)(\.|$)")
    for block, names in kxk.items():
        if not any(not shortcut.search(n[len(block) :]) for n in by_block.get(block, [])):
            picked.update(names)  # a block whose only 1×1 conv is its shortcut: its k×k convs mix channels
    if not picked:  # only the gates are plain layers (NFNet's weight-standardised convs): adapt those
        picked.update(gates)
    return [n for n in modules if n in picked]


_FAMILY_OF_CLASS = {
    # All blocks are attention blocks: the fused qkv, as the structure gives, named for the explicit preset:vit.
    "VisionTransformer": "vit",
    "VisionTransformerDistilled": "vit",
    "Beit": "vit",
    "Eva": "vit",
    "SwinTransformer": "swin",
    "SwinTransformerV2": "swin",
    # Only the block MLPs: the structure would add the stem-adjacent downsample / pointwise convs of each stage.
    "ConvNeXt": "convnext",
    # The 1×1 convs with the head conv, the published LoRA recipe for MobileNet / EfficientNet.
    "EfficientNet": "efficientnet",
    "MobileNetV3": "efficientnet",
    # Bottleneck 1×1 convs but basic-block k×k convs, decided per block: the same as the structure, kept explicit.
    "ResNet": "resnet",
}


def _auto_preset(model: nn.Module) -> list[str]:
    """The named preset of the model's family where one exists, else the targets the structure gives."""
    family = _FAMILY_OF_CLASS.get(type(model).__name__)
    if family is not None:
        return PRESETS[family](model)
    return _structural_preset(model)


PRESETS: dict[str, Callable[[nn.Module], list[str]]] = {
    "auto": _auto_preset,
    "vit": _attention_preset,
    "swin": _attention_preset,
    "attention": _attention_preset,
    "structure": _structural_preset,
    "convnext": _convnext_preset,
    "efficientnet": _pointwise_preset,
    "pointwise": _pointwise_preset,
    "resnet": _resnet_preset,
}


# ------------------------------------------------------------------------------------------------------ qkv layouts


def _thirds(attn: nn.Module, proj: nn.Module) -> QKVLayout | None:
    # forward: qkv.reshape(..., 3, heads, head_dim): [all q | all k | all v]
    return QKVLayout.thirds(proj.out_features) if proj.out_features % 3 == 0 else None


def _per_head_key_val(attn: nn.Module, proj: nn.Module) -> QKVLayout:
    # forward: qkv.view(B, N, heads, -1).split([key_dim, key_dim, val_dim], dim=3): per head [q | k | v], v wider
    return QKVLayout(attn.num_heads, attn.key_dim, attn.key_dim, attn.val_dim)


def _maxxvit_cl(attn: nn.Module, proj: nn.Module) -> QKVLayout | None:
    # forward: head_first: view(B, -1, heads, dim_head * 3).chunk(3, dim=3), else reshape(B, -1, 3, heads, dim_head)
    if attn.head_first:
        return QKVLayout(attn.num_heads, attn.dim_head, attn.dim_head, attn.dim_head)
    return _thirds(attn, proj)


def _gcvit(attn: nn.Module, proj: nn.Module) -> QKVLayout | None:
    # use_global: the "qkv" Linear projects k and v only (q comes from the global query): not a qkv layout
    return None if attn.use_global else _thirds(attn, proj)


# Attention class (module.qualname) -> (path of its fused projection inside it, the projection's q/k/v row layout read
# from the attention's attributes, following how its forward splits the projection). A fused projection of a class
# not listed here gets one LoRA over the whole projection, and the report says so.
_QKV_LAYOUTS: dict[str, tuple[str, Callable[[nn.Module, nn.Module], QKVLayout | None]]] = {
    **{
        cls: ("qkv", _thirds)
        for cls in (
            "timm.layers.attention.Attention",
            "timm.layers.attention.AttentionRope",
            "timm.layers.attention_pool2d.AttentionPool2d",
            "timm.layers.attention_pool2d.RotAttentionPool2d",
            "timm.layers.diff_attention.DiffAttention",  # chunk(3, dim=2)
            "timm.models.beit.Attention",  # also F.linear(x, qkv.weight, q_bias ⊕ k_bias ⊕ v_bias)
            "timm.models.cait.TalkingHeadAttn",
            "timm.models.coat.FactorAttnConvRelPosEnc",
            "timm.models.convit.MHSA",
            "timm.models.davit.ChannelAttention",
            "timm.models.davit.ChannelAttentionV2",
            "timm.models.davit.WindowAttention",
            "timm.models.edgenext.CrossCovarianceAttn",
            "timm.models.eva.EvaAttention",
            "timm.models.fastvit.Attention",
            "timm.models.hiera.MaskUnitAttention",
            "timm.models.hieradet_sam2.MultiScaleAttention",
            "timm.models.metaformer.Attention",
            "timm.models.mvitv2.MultiScaleAttention",
            "timm.models.nest.Attention",
            "timm.models.swin_transformer.WindowAttention",
            "timm.models.swin_transformer_v2.WindowAttention",
            "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention",
            "timm.models.twins.LocallyGroupedAttn",
            "timm.models.vision_transformer_relpos.RelPosAttention",
            "timm.models.vision_transformer_sam.Attention",
            "timm.models.volo.Attention",
            "timm.models.xcit.XCA",
        )
    },
    "timm.models.gcvit.WindowAttentionGlobal": ("qkv", _gcvit),
    "timm.models.tiny_vit.Attention": ("qkv", _per_head_key_val),
    "timm.models.efficientformer.Attention": ("qkv", _per_head_key_val),
    "timm.models.levit.Attention": ("qkv.linear", _per_head_key_val),
    "timm.models.maxxvit.AttentionCl": ("qkv", _maxxvit_cl),
}


def _class_key(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def qkv_layout(model: nn.Module, name: str) -> QKVLayout | None:
    """The q/k/v row layout of the fused attention projection `name` of `model`, or None when `name` is not the fused
    projection of an attention class whose layout is known (see `_QKV_LAYOUTS`)."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        return None
    parts = name.split(".")
    for depth in (1, 2):  # the attention module owns `qkv` directly, or through a norm wrapper (`qkv.linear`)
        if len(parts) <= depth:
            break
        owner = ".".join(parts[:-depth])
        entry = _QKV_LAYOUTS.get(_class_key(model.get_submodule(owner)))
        if entry is not None and entry[0] == ".".join(parts[-depth:]):
            layout = entry[1](model.get_submodule(owner), module)
            return layout if layout is not None and layout.out_features == module.out_features else None
    return None


def fused_note(name: str) -> str:
    """The report note for a projection named like a fused qkv / qk / kv (`qkv`, `qkv.linear`, `qkv_proj`, `qkvs.0`,
    `kv`) that is adapted as a whole, or ""."""
    parts = name.split(".")[-3:]
    if any("qkv" in part for part in parts):
        return "fused projection whose q/k/v layout is unknown: one LoRA over the whole projection"
    if any(part in ("qk", "kv") for part in parts):
        return "fused two-part projection (qk / kv): one LoRA over both parts"
    return ""


# ---------------------------------------------------------------------------------------------------- target search


def classifier_names(model: nn.Module) -> list[str]:
    """Dotted names of the classifier head module(s), from `get_classifier()` and `pretrained_cfg['classifier']`."""
    by_id = {id(m): n for n, m in model.named_modules()}
    names = []
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        for head in heads if isinstance(heads, (tuple, list)) else [heads]:
            if id(head) in by_id and sum(p.numel() for p in head.parameters()):
                names.append(by_id[id(head)])
    cfg_names = getattr(model, "pretrained_cfg", {}).get("classifier") or []
    modules = dict(model.named_modules())
    for n in [cfg_names] if isinstance(cfg_names, str) else cfg_names:
        if n in modules and n not in names and sum(p.numel() for p in modules[n].parameters()):
            names.append(n)
    return names


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _select(model: nn.Module, pattern: str) -> list[str]:
    if pattern.startswith("preset:"):
        preset = pattern[len("preset:") :]
        if preset not in PRESETS:
            raise VisionLoRAError(f"Unknown LoRA preset {preset!r}; choose one of {sorted(PRESETS)}.")
        return PRESETS[preset](model)
    return [n for n, _ in model.named_modules() if n and _matches(n, pattern)]


def _adaptable(m: nn.Module) -> bool:
    return type(m) in _SUPPORTED and not (isinstance(m, nn.Conv2d) and m.groups != 1)


def _why_not(name: str, m: nn.Module, heads: list[str]) -> str | None:
    """Why module `name` cannot be a LoRA target, or None when it can."""
    if any(name == h or name.startswith(h + ".") for h in heads):
        return f"'{name}' is (part of) the classifier head, which trains in full; leave it out of the targets"
    if isinstance(m, LoRALayer):
        return f"'{name}' already has LoRA"
    if type(m) in _SUPPORTED:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            return f"'{name}' is a grouped/depthwise conv (groups={m.groups}), which LoRA does not adapt"
        return None
    if not any(True for _ in m.parameters(recurse=False)) and any(True for _ in m.children()):
        inner = [f"{name}.{n}" for n, c in m.named_modules() if n and _adaptable(c)][:4]
        hint = f"; target its layers instead, e.g. {', '.join(inner)}" if inner else ""
        return f"'{name}' is a container module ({type(m).__name__}){hint}"
    return (
        f"'{name}' is a {type(m).__name__}, which LoRA cannot adapt (supported: nn.Linear, nn.Conv2d, timm Conv2dSame)"
    )


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The dotted names of the modules `config` selects in `model`, in model order (without those a preset skips).

    Raises:
        VisionLoRAError: a pattern matches nothing, or explicitly matches a module LoRA cannot adapt.
    """
    return resolve_with_skips(model, config)[0]


def resolve_with_skips(model: nn.Module, config: LoRAConfig) -> tuple[list[str], list[tuple[str, str]], set[str]]:
    """(targets in model order, (name, reason) of the modules presets skipped, targets only a preset selected)."""
    modules = dict(model.named_modules())
    heads = classifier_names(model)
    adaptable = [n for n, m in modules.items() if n and _adaptable(m) and _why_not(n, m, heads) is None]
    patterns = config.target_modules if config.target_modules is not None else ["preset:auto"]
    if not patterns:
        raise VisionLoRAError("target_modules is empty; give module-name patterns or leave it unset for the preset.")
    excluded = {n for p in config.exclude_modules for n in _select(model, p)}
    selected: set[str] = set()
    by_preset: set[str] = set()
    skipped: dict[str, str] = {}
    for pattern in patterns:
        names = [n for n in _select(model, pattern) if n not in excluded]
        is_preset = pattern.startswith("preset:")
        if is_preset:
            names = [n for n in names if not any(n == h or n.startswith(h + ".") for h in heads)]
            for n in names:
                reason = _why_not(n, modules[n], heads) or _reads_image(model, n)
                if reason is not None:
                    skipped[n] = reason.replace(f"'{n}' ", "", 1)
            names = [n for n in names if n not in skipped]
        if not names:
            close = difflib.get_close_matches(pattern, adaptable, n=5, cutoff=0.3) or adaptable[:5]
            raise VisionLoRAError(
                f"LoRA target pattern {pattern!r} matches no module of {type(model).__name__}. "
                f"Adaptable modules include: {', '.join(close)}."
            )
        for n in names:
            reason = _why_not(n, modules[n], heads)
            if reason is not None:
                raise VisionLoRAError(f"LoRA target pattern {pattern!r} cannot be used: {reason}.")
        (by_preset.update if is_preset else selected.update)(names)
    explicit = set(selected)
    selected |= by_preset
    order = [n for n in modules if n in selected]
    return order, [(n, skipped[n]) for n in modules if n in skipped and n not in selected], by_preset - explicit


def _reads_image(model: nn.Module, name: str) -> str | None:
    """Why a preset leaves out a conv that reads the input image (the stem), or None."""
    m = model.get_submodule(name)
    in_chans = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0]
    if isinstance(m, nn.Conv2d) and m.in_channels == in_chans and m.in_channels < 8:
        return f"reads the {in_chans}-channel input image (stem); name it explicitly to adapt it"
    return None
