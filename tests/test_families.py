"""Every timm family adapts with the default config: q/k/v layouts proved per attention class (fast), and the
family sweep over every timm model module (slow)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from qkv_probe import attention_inputs, changed
from torch import nn

from vision_lora import LoRAConfig, apply_lora, load_adapter, merge_lora, read_adapter_config, save_adapter, save_merged
from vision_lora.lora import LoRAQKVLinear, QKVLayout, classifier_names, lora_layers, qkv_layout


def _first_fused_qkv(model: nn.Module) -> str:
    """The first fused qkv projection with a known layout, a per-head interleaved one where the model has any."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and qkv_layout(model, n) is not None]
    return next((n for n in names if not qkv_layout(model, n).is_thirds), names[0])


def _owner(name: str) -> str:
    return name[: name.rindex(".qkv")]


def _input_for(model: nn.Module) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"][1:]
    if getattr(model, "patch_embed", None) is not None and getattr(model.patch_embed, "img_size", None):
        size = model.patch_embed.img_size
    return torch.randn(1, 3, *size)


def _randomize_B(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.5)


def prove_qkv_layout(model: nn.Module, name: str, x: torch.Tensor) -> tuple[set, set]:
    """Adapt only projection `name`, once on slice "v" and once on "qk", and record what its attention consumes.

    The operands the attention takes from the projection (q, kᵀ, v as they enter its products or sdpa; attention
    weights and earlier products left aside, they mix q, k and v by design) must be moved by exactly one of the two
    updates: the v update never reaches q or k (bit-identical), the q/k update never reaches v. Returns the moved
    operand positions of both updates."""
    model.eval()
    attn = model.get_submodule(_owner(name))
    ref_ops, derived = attention_inputs(model, attn, x)
    assert ref_ops, f"no matmul / sdpa recorded in {type(attn).__name__}"
    moved = {}
    for slices in ("v", "qk"):
        adapted = copy.deepcopy(model)
        apply_lora(adapted, LoRAConfig(r=2, lora_alpha=2, target_modules=[name], qkv_slices=slices))
        _randomize_B(adapted)
        adapted.eval()
        ops, _ = attention_inputs(adapted, adapted.get_submodule(_owner(name)), x)
        moved[slices] = changed(ref_ops, ops) - derived
    assert moved["v"] and moved["qk"], moved
    assert not moved["v"] & moved["qk"], f"operands moved by both the v and the q/k update: {moved}"
    return moved["v"], moved["qk"]


def _small(name: str, **kwargs):
    return lambda: timm.create_model(name, num_classes=3, **kwargs)


_VIT_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
_SWIN_SMALL = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)

# One model per attention class whose layout is in the table and that matters most: the per-head interleaved
# layouts (the bug of issue 15) and the [q|k|v] families most used. The slow sweep proves every other class.
LAYOUT_MODELS = {
    "vit": _small("test_vit"),
    "beit": _small("beit_base_patch16_224", **_VIT_SMALL),
    "eva": _small("eva02_tiny_patch14_224", **_VIT_SMALL),
    "swin": _small("swin_tiny_patch4_window7_224", **_SWIN_SMALL),
    "swinv2": _small("swinv2_tiny_window8_256", **_SWIN_SMALL),
    "tiny_vit": _small("tiny_vit_5m_224"),
    "efficientformer": _small("efficientformer_l1"),
    "levit": _small("levit_128s"),
    "maxxvit_rw": _small("maxvit_rmlp_pico_rw_256"),
}


@pytest.mark.parametrize("family", LAYOUT_MODELS)
def test_v_slice_update_reaches_only_v(family):
    model = LAYOUT_MODELS[family]()
    for m in model.modules():  # SwinV2 zero-inits its res-post-norm, which would hide the attention branch
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
    name = _first_fused_qkv(model)
    if family in ("tiny_vit", "efficientformer", "levit", "maxxvit_rw"):
        assert not qkv_layout(model, name).is_thirds
    prove_qkv_layout(model, name, _input_for(model))


def test_probe_catches_row_thirds_on_a_per_head_layout():
    """The pre-fix behaviour (q, k, v as row thirds) on tiny_vit's per-head [q|k|v] fails the probe: the check can
    see the bug that identity and merge tests cannot."""
    model = timm.create_model("tiny_vit_5m_224", num_classes=3).eval()
    name = _first_fused_qkv(model)
    assert not qkv_layout(model, name).is_thirds
    x = _input_for(model)
    attn = model.get_submodule(_owner(name))
    ref_ops, _ = attention_inputs(model, attn, x)
    moved = {}
    for slices in ("v", "qk"):
        wrong = copy.deepcopy(model)
        qkv = wrong.get_submodule(name)
        layer = LoRAQKVLinear(qkv, 2, 2, slices=slices, layout=QKVLayout.thirds(qkv.out_features))
        nn.init.normal_(layer.lora_B, std=0.5)
        wrong.get_submodule(_owner(name)).qkv = layer
        ops, derived = attention_inputs(wrong, wrong.get_submodule(_owner(name)), x)
        moved[slices] = changed(ref_ops, ops) - derived
    assert moved["v"] & moved["qk"]


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("tiny_vit_5m_224", QKVLayout(4, 32, 32, 32)),
        ("efficientformer_l1", QKVLayout(8, 32, 32, 128)),
        ("levit_128s", QKVLayout(4, 16, 16, 32)),
        ("test_vit", QKVLayout.thirds(3 * 64)),
    ],
)
def test_qkv_layout_is_read_from_the_attention_attributes(model_name, expected):
    model = timm.create_model(model_name)
    assert qkv_layout(model, _first_fused_qkv(model)) == expected


def _as_format_1(directory) -> None:
    """Rewrite an adapter config the way vision_lora wrote it before qkv layouts were recorded."""
    path = directory / "adapter_config.json"
    info = json.loads(path.read_text())
    info["format"] = "vision_lora.adapter/1"
    del info["qkv_layouts"]
    path.write_text(json.dumps(info))


def test_adapter_records_qkv_layouts_and_old_files_load_where_rows_were_thirds(tmp_path):
    base = timm.create_model("test_vit", num_classes=3)
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig())
    _randomize_B(model)
    save_adapter(model, tmp_path)
    info = read_adapter_config(tmp_path)
    assert info["format"] == "vision_lora.adapter/2"
    assert info["qkv_layouts"]["blocks.0.attn.qkv"] == {"groups": 1, "q": 64, "k": 64, "v": 64}
    _as_format_1(tmp_path)
    loaded = load_adapter(base, tmp_path)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_old_adapter_of_a_per_head_qkv_family_is_refused(tmp_path):
    model = timm.create_model("tiny_vit_5m_224", num_classes=3)
    apply_lora(model, LoRAConfig())
    save_adapter(model, tmp_path)
    fresh = timm.create_model("tiny_vit_5m_224", num_classes=3)
    load_adapter(copy.deepcopy(fresh), tmp_path)  # the current format loads
    _as_format_1(tmp_path)
    with pytest.raises(ValueError, match=r"older vision_lora .* row thirds.*Retrain"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)


def test_adapter_with_another_recorded_layout_is_refused(tmp_path):
    model = timm.create_model("tiny_vit_5m_224", num_classes=3)
    apply_lora(model, LoRAConfig())
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    info = json.loads(path.read_text())
    info["qkv_layouts"]["stages.1.blocks.0.attn.qkv"]["groups"] = 1
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="another timm version"):
        load_adapter(timm.create_model("tiny_vit_5m_224", num_classes=3), tmp_path)


# ------------------------------------------------------------------------------------------------- family sweep
#
# tests/families.json (written by tests/make_families.py from timm itself): for every timm model module its smallest
# model, plus one model per further attention variant. Each runs with random weights, batch 1, its default input size.

_SWEEP = json.loads((Path(__file__).with_name("families.json")).read_text())
MAX_PARAMS = 300_000_000
MAX_SIDE = 512


def _exclusion(entry: dict) -> str | None:
    """The fixed rule that keeps the sweep within 15 minutes on 2 CPU cores."""
    if entry["params"] > MAX_PARAMS:
        return f"{entry['params'] / 1e6:.0f} M parameters > {MAX_PARAMS / 1e6:.0f} M"
    if max(entry["input_size"][1:]) > MAX_SIDE:
        return f"input {entry['input_size'][1]}x{entry['input_size'][2]} > {MAX_SIDE} px"
    return None


# Families LoRAConfig() cannot adapt, with the reason a user reads; the sweep checks that they are refused.
REFUSED: dict[str, str] = {}

SWEEP = [e for e in _SWEEP["models"] if _exclusion(e) is None]
EXCLUDED = {e["model"]: _exclusion(e) for e in _SWEEP["models"] if _exclusion(e) is not None}


@torch.no_grad()
def _nonzero(model: nn.Module) -> nn.Module:
    """Random init stands in for pretrained weights, but zero-initialised residual branches (the last BatchNorm of
    tiny_vit's MBConv and ResNet blocks, SwinV2 post-norms) would cut their adapters off from the gradient: make every
    all-zero weight non-zero (norm scales 1, others small noise), and turn stochastic depth off."""
    for n, p in model.named_parameters():
        if not n.endswith("bias") and p.numel() and not p.any():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(std=0.02)
        elif p.dim() == 1 and p.numel() and p.abs().max() < 1e-3 and "bias" not in n:  # layer scale 1e-5: gradients
            p.fill_(1.0)  # through tens of such blocks underflow to exactly 0
    for m in model.modules():  # stochastic depth / dropout would cut a block off for a whole step
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _loss(out) -> torch.Tensor:
    # Linear in the logits: its gradient never vanishes (a cross-entropy saturates after one step with the head).
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def test_sweep_covers_every_timm_module_and_lists_exclusions():
    assert _SWEEP["timm"] == timm.__version__, "timm changed: rerun tests/make_families.py"
    assert {e["module"] for e in _SWEEP["models"]} | {m for m in REFUSED} >= set(timm.list_modules()) - {
        m for m in timm.list_modules() if not timm.list_models(module=m)
    }
    for name, why in EXCLUDED.items():
        assert why, name


@pytest.fixture
def one_thread():
    """Batch-1 models on a shared 2-core machine run 2-4x faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("entry", SWEEP, ids=[f"{e['module']}:{e['model']}" for e in SWEEP])
def test_family_adapts_with_the_default(entry, tmp_path, one_thread):
    name = entry["model"]
    torch.manual_seed(0)
    model = _nonzero(timm.create_model(name, pretrained=False, num_classes=5).eval())
    x = torch.randn(1, *entry["input_size"])
    if entry["module"] in REFUSED:
        with pytest.raises(ValueError):
            apply_lora(model, LoRAConfig())
        return
    base = copy.deepcopy(model)
    with torch.no_grad():
        before = _first(model(x))
    report = apply_lora(model, LoRAConfig())
    layers = lora_layers(model)
    model.eval()
    with torch.no_grad():  # identity at init: B = 0
        torch.testing.assert_close(_first(model(x)), before, rtol=0, atol=0)

    # Exactly the LoRA tensors and the classifier head train.
    heads = classifier_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    head = {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in heads)}
    assert lora and trainable == lora | head

    # Every LoRA tensor moves within two optimizer steps (B in the first; A once B is non-zero). The step is sign-SGD
    # (Adam's first step): at random init a saturated softmax leaves gradients near 1e-20, which must still count,
    # and whose squares would underflow Adam's second moment.
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in lora}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(2):
        for p in params:
            p.grad = None
        _loss(model(x)).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad.sign(), alpha=1e-3)
    still = [n for n, p in model.named_parameters() if n in lora and torch.equal(p, start[n])]
    assert not still, f"{len(still)} LoRA tensors did not move, e.g. {still[:3]}"

    # Every stage (timm feature_info) that has an adaptable layer holds an adapter.
    stages = [f["module"] for f in getattr(model, "feature_info", []) if "stem" not in f["module"]]
    for stage in stages:
        inside = [n for n in layers if n.startswith(stage + ".") or n == stage]
        candidates = [  # channel-mixing layers; a stage of k×k convs only is a stem
            n
            for n, m in model.named_modules()
            if n.startswith(stage + ".")
            and (type(m) is nn.Linear or (type(m) is nn.Conv2d and m.kernel_size == (1, 1)))
        ]
        assert inside or not candidates or _only_unadaptable(model, candidates, report), f"stage {stage} not adapted"

    # q/k/v slices land on q/k/v: proved on the first fused projection of each attention class.
    first_of_class = {}
    for n, m in layers.items():
        if isinstance(m, LoRAQKVLinear):
            first_of_class.setdefault(type(model.get_submodule(_owner(n))), n)
    for n in first_of_class.values():
        prove_qkv_layout(base, n, x)

    # merged == unmerged, and the merged file loads in plain timm.
    model.eval()
    for layer in layers.values():
        layer.lora_B.data.normal_(std=0.02)  # a visible update, the trained one is tiny
    with torch.no_grad():
        unmerged = _first(model(x))
        path = save_merged(model, tmp_path / "merged.pth")  # .pth: safetensors refuses coat's shared cpe weights
        merged = _first(merge_lora(model)(x))
        plain = timm.create_model(name, pretrained=False, num_classes=5, checkpoint_path=str(path)).eval()
        reloaded = _first(plain(x))
    scale = unmerged.abs().max().clamp_min(1e-6)
    assert (merged - unmerged).abs().max() / scale < 1e-4
    assert (reloaded - merged).abs().max() / scale < 1e-5


def _only_unadaptable(model: nn.Module, names: list[str], report) -> bool:
    skipped = {n for n, _ in report.skipped}
    return all(
        n in skipped or (isinstance(model.get_submodule(n), nn.Conv2d) and model.get_submodule(n).groups > 1)
        for n in names
    )
