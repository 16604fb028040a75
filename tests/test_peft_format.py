"""PEFT's adapter format both ways, with the installed peft as the independent reference: the PEFT side runs in a
subprocess that imports timm + peft only (tests/peft_side.py), several round trips per subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize_adapter
from safetensors.torch import load_file, save_file

from vision_lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from vision_lora.lora import LoRAQKVLinear, QKVLayout, lora_layers

_SIDE = Path(__file__).with_name("peft_side.py")


# Tiny versions of the families whose attention reads `qkv.weight` directly (timm kwargs, input side).
_TINY = {
    "beit_base_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "eva02_tiny_patch14_224": (dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2), 28),
    "swinv2_tiny_window8_256": (dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)), 64),
}
# PEFT's unmerged model ignores qkv adapters where attention reads `qkv.weight` directly: compare with its merged one.
_WEIGHT_READERS = set(_TINY)


def _base(name: str, num_classes: int = 4, tiny: bool = False) -> torch.nn.Module:
    torch.manual_seed(1)  # the same random "pretrained" backbone every time
    kwargs = _TINY[name][0] if tiny else {}
    return timm.create_model(name, num_classes=num_classes, **kwargs).eval()


def _adapted(name: str, seed: int = 0, tiny: bool = False, **config) -> torch.nn.Module:
    model = _base(name, tiny=tiny)
    apply_lora(model, LoRAConfig(**config))
    randomize_adapter(model, seed)
    return model.eval()


def _x(model: torch.nn.Module, side: int | None = None) -> torch.Tensor:
    size = (side, side) if side else model.pretrained_cfg["input_size"][1:]
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |difference| / max |logit|."""
    return float((got - want).abs().max() / want.abs().max())


def _run_side(tmp_path: Path, jobs: list[dict]) -> list[dict[str, torch.Tensor]]:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(_SIDE), str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(job["out"]) for job in jobs]


def _job(tmp_path: Path, i: int, model: torch.nn.Module, name: str, mode: str, tiny: bool = False, **extra) -> dict:
    """Hand the base weights and inputs over as files."""
    base, x = tmp_path / f"base{i}.safetensors", tmp_path / f"x{i}.safetensors"
    plain = _base(name, int(model.num_classes), tiny=tiny)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    save_file({"x": _x(model, _TINY[name][1] if tiny else None)}, str(x))
    return {
        "kwargs": _TINY[name][0] if tiny else {},
        "tiny": tiny,
        "mode": mode,
        "model": name,
        "num_classes": int(model.num_classes),
        "base": str(base),
        "x": str(x),
        "adapter": str(tmp_path / f"adapter{i}"),
        "out": str(tmp_path / f"out{i}.safetensors"),
        **extra,
    }


_TO_PEFT = [
    ("test_vit", dict(r=4, lora_alpha=8)),  # per-slice q, v -> one rank-8 LoRA on the whole qkv
    (
        "test_vit",
        dict(
            r=2,
            lora_alpha=4,
            use_dora=True,
            use_rslora=True,
            qkv_slices="v",
            target_modules=["qkv", "fc1"],
            rank_pattern={"blocks.0.attn.qkv": 3},
            alpha_pattern={"fc1": 5.0},
        ),
    ),
    ("test_resnet", dict(r=2, lora_alpha=4, use_dora=True)),  # 3×3 and 1×1 convs
    ("test_convnext", dict(r=4, lora_alpha=4)),
    ("test_efficientnet", dict(r=2, lora_alpha=4, use_dora=True)),
    ("beit_base_patch16_224", dict(r=2, lora_alpha=4, use_dora=True, tiny=True)),
    ("eva02_tiny_patch14_224", dict(r=2, lora_alpha=4, tiny=True)),
    ("swinv2_tiny_window8_256", dict(r=2, lora_alpha=4, use_dora=True, qkv_slices="qkv", tiny=True)),
]

_FROM_PEFT = [
    (
        "test_vit",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["qkv", "fc1"],
            modules_to_save=["head"],
            rank_pattern={"blocks.1.attn.qkv": 2},
            alpha_pattern={"fc1": 3},
            use_rslora=True,
        ),
    ),
    ("test_vit", dict(r=4, lora_alpha=8, target_modules=["qkv", "proj"], modules_to_save=["head"], use_dora=True)),
    (
        "test_resnet",
        dict(r=2, lora_alpha=4, target_modules=r".*layer\d\.\d\.conv\d", modules_to_save=["fc"], use_dora=True),
    ),
    ("test_convnext", dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head.fc"])),
    ("beit_base_patch16_224", dict(r=2, lora_alpha=4, target_modules=["qkv"], modules_to_save=["head"], use_dora=True)),
    ("swinv2_tiny_window8_256", dict(r=2, lora_alpha=4, target_modules=["qkv", "fc1"], modules_to_save=["head.fc"])),
]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Both directions in one PEFT subprocess: vision_lora adapters loaded by PEFT, PEFT adapters made by PEFT."""
    tmp_path = tmp_path_factory.mktemp("peft")
    models, jobs = [], []
    for i, (name, config) in enumerate(_TO_PEFT):
        model = _adapted(name, seed=i, **config)
        save_adapter(model, tmp_path / f"adapter{i}", format="peft")
        models.append(model)
        jobs.append(_job(tmp_path, i, model, name, "load", tiny=config.get("tiny", False)))
    for i, (name, config) in enumerate(_FROM_PEFT, start=len(jobs)):
        tiny = name in _TINY
        jobs.append(_job(tmp_path, i, _base(name, tiny=tiny), name, "make", tiny=tiny, config=config, seed=i))
    outs = _run_side(tmp_path, jobs)
    n = len(_TO_PEFT)
    to_peft = list(zip(models, jobs[:n], outs[:n], strict=True))
    return tmp_path, to_peft, list(zip(jobs[n:], outs[n:], strict=True))


def test_vision_lora_adapters_load_in_peft_to_the_same_logits(round_trips):
    for model, job, out in round_trips[1]:
        with torch.no_grad():
            ours = model(load_file(job["x"])["x"])
        if job["model"] not in _WEIGHT_READERS:
            assert _rel(out["logits"], ours) <= 1e-5, job["model"]
        assert _rel(out["merged"], ours) <= 1e-5, job["model"]


def test_peft_adapters_load_in_vision_lora_to_the_same_logits_and_convert_back(round_trips):
    tmp_path = round_trips[0]
    for job, out in round_trips[2]:
        model = load_adapter(_base(job["model"], tiny=job["tiny"]), job["adapter"])
        with torch.no_grad():
            ours = model(load_file(job["x"])["x"])
        reference = out["merged"] if job["model"] in _WEIGHT_READERS else out["logits"]
        assert _rel(ours, reference) <= 1e-5, job["model"]
        # ... and back to PEFT's format: the same tensors.
        save_adapter(model, tmp_path / "back", format="peft")
        original = load_file(str(Path(job["adapter"]) / "adapter_model.safetensors"))
        again = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
        assert set(again) == set(original)
        for key, value in original.items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_per_slice_qkv_is_exactly_a_rank_2r_lora_on_the_whole_projection():
    """For any row layout (here per head, v wider): stacked A, block B, the scale kept through alpha."""
    from vision_lora.lora.peft_format import _peft_factors

    for use_rslora in (False, True):
        layer = LoRAQKVLinear(torch.nn.Linear(12, 44), 3, 5, use_rslora=use_rslora, layout=QKVLayout(4, 3, 3, 5))
        with torch.no_grad():
            layer.lora_B.normal_()
        a, b, magnitude, alpha = _peft_factors("qkv", layer)
        assert a.shape == (6, 12) and b.shape == (44, 6) and magnitude is None
        scale = alpha / (6**0.5 if use_rslora else 6)
        torch.testing.assert_close(scale * b @ a, layer.delta_weight())
        k_rows = layer.layout.rows("k")
        assert torch.equal(b[k_rows], torch.zeros_like(b[k_rows]))


def test_dora_on_some_qkv_slices_converts_with_the_row_norm_as_magnitude():
    from vision_lora.lora.peft_format import _peft_factors

    layer = LoRAQKVLinear(torch.nn.Linear(12, 36), 2, 4, slices="qv", use_dora=True)
    _, _, magnitude, _ = _peft_factors("qkv", layer)
    k_rows = layer.layout.rows("k")
    torch.testing.assert_close(magnitude[k_rows], layer.base_layer.weight[k_rows].norm(dim=1))


# -- bad input: one clear error, and the model is left as it was ------------------------------------------------------


@pytest.fixture
def peft_dir(tmp_path):
    model = _adapted("test_vit", r=2, lora_alpha=4, use_dora=True)
    return save_adapter(model, tmp_path / "peft", format="peft")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _refused(model, directory, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, directory)
    assert "\n" not in str(err.value)
    assert not lora_layers(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_target_modules_that_match_nothing_name_the_closest(peft_dir):
    _edit_config(peft_dir, target_modules=["qkvx"])
    _refused(_base("test_vit"), peft_dir, r"'qkvx' .*matches no module .*closest: qkv")


def test_tensor_shape_mismatch_names_the_key_and_both_shapes(peft_dir):
    key = "base_model.model.blocks.1.attn.qkv.lora_A.weight"
    _edit_weights(peft_dir, lambda t: t.__setitem__(key, torch.zeros(2, 7)))
    _refused(_base("test_vit"), peft_dir, r"blocks\.1\.attn\.qkv\.lora_A\.weight has shape \(2, 7\), .*\(4, 64\)")


def test_another_backbone_or_class_count_is_refused(peft_dir):
    _refused(_base("test_resnet"), peft_dir, "trained on 'test_vit'")
    _refused(_base("test_vit", num_classes=5), peft_dir, "num_classes=4")
    _edit_config(peft_dir, base_model_name_or_path=None)
    _refused(_base("test_resnet"), peft_dir, "matches no module of test_resnet")


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_weights_file_that_is_not_safetensors_is_refused(peft_dir, damage):
    path = peft_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x04\x95 not safetensors")
    _refused(_base("test_vit"), peft_dir, "not a readable safetensors file")


def test_unsupported_peft_features_are_one_line_errors(peft_dir):
    _edit_config(peft_dir, layers_to_transform=[0])
    _refused(_base("test_vit"), peft_dir, "layers_to_transform")
    _edit_config(peft_dir, layers_to_transform=None, peft_type="LOHA")
    _refused(_base("test_vit"), peft_dir, "PEFT LOHA adapter")
    _edit_config(peft_dir, peft_type="LORA")
    _edit_weights(peft_dir, lambda t: t.__setitem__("base_model.model.pos_embed.lora_embedding_A", torch.zeros(2, 3)))
    _refused(_base("test_vit"), peft_dir, "LoRA on an embedding")


def test_a_head_that_is_not_in_the_file_is_refused(peft_dir):
    _edit_weights(peft_dir, lambda t: [t.pop(k) for k in list(t) if ".head." in k])
    _edit_config(peft_dir, modules_to_save=None)
    _refused(_base("test_vit"), peft_dir, "no classifier head")


def test_dora_norm_overflow_in_half_precision_is_refused_before_any_change():
    model = _base("test_vit").half()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(3000.0)  # row norm 3000·sqrt(64) = 24000 fits; ·4 does not
        model.blocks[1].attn.qkv.weight.fill_(12000.0)
    before = model.blocks[1].attn.qkv.weight.clone()
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.*DoRA.*overflows"):
        apply_lora(model, LoRAConfig(use_dora=True))
    assert not lora_layers(model) and torch.equal(model.blocks[1].attn.qkv.weight, before)


def test_strided_same_padding_conv_is_refused_for_peft_by_name(tmp_path):
    model = _base("tf_efficientnet_lite0")
    apply_lora(model, LoRAConfig(r=2, target_modules=["conv_stem", "conv_pw"], exclude_modules=[]))
    with pytest.raises(ValueError, match="'conv_stem' is a timm Conv2dSame"):
        save_adapter(model, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_peft_adapter_trains_on_and_merges(tmp_path, peft_dir):
    model = load_adapter(_base("test_vit"), peft_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path / "ours", class_names=list("abcd"))
    again = load_adapter(_base("test_vit"), tmp_path / "ours")
    merged = merge_lora(again)
    with torch.no_grad():
        assert _rel(merged(x), expected) <= 1e-5


# -- real families (slow): ViT, Swin v1, ConvNeXt, EfficientNet, ResNet; BEiT / EVA / SwinV2 against PEFT merged ----

_FAMILIES = [
    ("vit_small_patch16_224", dict(r=4, lora_alpha=8, use_dora=True)),
    ("swin_tiny_patch4_window7_224", dict(r=4, lora_alpha=8, use_rslora=True)),
    ("convnext_tiny", dict(r=4, lora_alpha=8, use_dora=True)),
    ("efficientnet_b0", dict(r=4, lora_alpha=8)),
    ("resnet18", dict(r=4, lora_alpha=8, use_dora=True)),
    ("beit_base_patch16_224", dict(r=4, lora_alpha=8, use_dora=True)),
    ("eva02_tiny_patch14_224", dict(r=4, lora_alpha=8)),
    ("swinv2_tiny_window8_256", dict(r=4, lora_alpha=8, use_dora=True)),
]


@pytest.mark.slow
def test_real_families_round_trip_through_peft(tmp_path):
    models, jobs = [], []
    for i, (name, config) in enumerate(_FAMILIES):
        model = _adapted(name, seed=i, **config)
        save_adapter(model, tmp_path / f"adapter{i}", format="peft")
        models.append(model)
        jobs.append(_job(tmp_path, i, model, name, "load"))
    # ... and PEFT's own adapters of the same families, read back.
    peft_made = []
    for i, (name, config) in enumerate(_FAMILIES, start=len(jobs)):
        targets = json.loads((tmp_path / f"adapter{i - len(_FAMILIES)}" / "adapter_config.json").read_text())
        peft_config = {
            "r": config["r"],
            "lora_alpha": config["lora_alpha"],
            "use_dora": config.get("use_dora", False),
            "use_rslora": config.get("use_rslora", False),
            "target_modules": targets["target_modules"],
            "modules_to_save": targets["modules_to_save"],
        }
        peft_made.append(_job(tmp_path, i, models[i - len(_FAMILIES)], name, "make", config=peft_config, seed=i))
    outs = _run_side(tmp_path, jobs + peft_made)
    for model, job, out in zip(models, jobs, outs[: len(jobs)], strict=True):
        with torch.no_grad():
            ours = model(load_file(job["x"])["x"])
        reference = out["merged"] if job["model"] in _WEIGHT_READERS else out["logits"]
        assert _rel(reference, ours) <= 1e-5, job["model"]
        assert _rel(out["merged"], ours) <= 1e-5, job["model"]
    for job, out in zip(peft_made, outs[len(jobs) :], strict=True):
        model = load_adapter(_base(job["model"]), job["adapter"])
        with torch.no_grad():
            ours = model(load_file(job["x"])["x"])
        reference = out["merged"] if job["model"] in _WEIGHT_READERS else out["logits"]
        assert _rel(ours, reference) <= 1e-5, job["model"]
