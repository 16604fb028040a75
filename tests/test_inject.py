from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from vision_lora import LoRAConfig, LoRALayer, apply_lora, merge_lora
from vision_lora.lora import lora_layers, resolve_targets

FAMILIES = {
    "vit": lambda: timm.create_model("test_vit", num_classes=5),
    "deit": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    ),
    "convnext": lambda: timm.create_model("test_convnext", num_classes=5),
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=5),
    "efficientnet_lite0": lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5),
    "resnet": lambda: timm.create_model("test_resnet", num_classes=5),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=5,
        img_size=32,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
    ),
}

# What the default preset must pick in each family (a sample of names) and never pick.
EXPECTED = {
    "vit": (["blocks.0.attn.qkv", "blocks.1.attn.qkv"], ["head", "blocks.0.mlp.fc1", "blocks.0.attn.proj"]),
    "deit": (["blocks.0.attn.qkv"], ["head", "head_dist"]),
    "convnext": (["stages.0.blocks.0.mlp.fc1", "stages.0.blocks.0.mlp.fc2"], ["head.fc", "stages.0.blocks.0.conv_dw"]),
    "efficientnet": (
        ["blocks.1.0.conv_pwl", "blocks.3.0.conv_pw", "conv_head"],
        ["blocks.3.0.conv_dw", "blocks.3.0.se.conv_reduce", "classifier"],
    ),
    "efficientnet_lite0": (
        ["blocks.0.0.conv_pw", "blocks.1.0.conv_pw", "blocks.1.0.conv_pwl", "conv_head"],
        ["blocks.1.0.conv_dw", "conv_stem", "classifier"],
    ),
    "resnet": (
        ["layer1.0.conv1", "layer1.0.conv2", "layer3.0.conv1", "layer3.0.conv3", "layer2.0.downsample.1"],
        ["layer3.0.conv2", "conv1.0", "fc"],
    ),
    "swin": (["layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv"], ["head.fc"]),
}


def _input(model, batch=2):
    size = model.pretrained_cfg["input_size"][1:]
    if getattr(model, "patch_embed", None) is not None and hasattr(model.patch_embed, "img_size"):
        size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size)


def _train(model, steps=3, lr=5e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x = _input(model, 4)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 5, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_picks_the_family_targets(family):
    model = FAMILIES[family]()
    report = apply_lora(model, LoRAConfig())
    adapted = {row.name for row in report.rows}
    must, never = EXPECTED[family]
    assert set(must) <= adapted
    assert not adapted & set(never)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lifecycle_per_family(family):
    """Right after injection the model is the base model; after training only the adapter and head moved; merged
    output equals unmerged output; rank(ΔW) <= r; the plain model comes back."""
    model = FAMILIES[family]().eval()
    base_keys = list(model.state_dict())
    base_classes = {n: type(m) for n, m in model.named_modules()}
    x = _input(model)
    with torch.no_grad():
        before = model(x)
    report = apply_lora(model, LoRAConfig(r=4, lora_alpha=8))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)

    frozen = {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if "lora_" not in n and "head" not in n and not n.startswith(("fc.", "classifier."))
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all("lora_" in n or n.split(".")[0] in {"head", "head_dist", "fc", "classifier"} for n in trainable)

    _train(model)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable
    assert any("lora_B" in n for n in grads) and any("lora_A" in n for n in grads)
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"frozen {n} changed"

    for layer in lora_layers(model).values():
        delta = layer.delta_weight().detach().flatten(1)
        slices = delta.chunk(3) if hasattr(layer, "slices") else [delta]  # each qkv slice has its own rank-r update
        assert all(torch.linalg.matrix_rank(d, rtol=1e-4) <= 4 for d in slices)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - before).abs().max() > 0
        plain = merge_lora(model)
        merged = plain(x)
    assert (merged - unmerged).abs().max() / unmerged.abs().max() < 1e-5
    assert list(plain.state_dict()) == base_keys
    assert {n: type(m) for n, m in plain.named_modules()} == base_classes
    assert not lora_layers(plain)


def test_frozen_batchnorm_statistics_stay_fixed_in_train_mode():
    model = timm.create_model("test_resnet", num_classes=5)
    apply_lora(model, LoRAConfig())
    model.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model(torch.randn(4, 3, 64, 64))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert model.training and not model.bn1.training


def test_train_norm_lets_batchnorm_train():
    model = timm.create_model("test_resnet", num_classes=5)
    apply_lora(model, LoRAConfig(train_norm=True))
    assert model.bn1.weight.requires_grad
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert not torch.equal(model.bn1.running_mean, before)


def test_bias_option_trains_biases():
    model = timm.create_model("test_vit", num_classes=5)
    apply_lora(model, LoRAConfig(bias="all"))
    assert model.blocks[0].mlp.fc1.bias.requires_grad and not model.blocks[0].mlp.fc1.weight.requires_grad
    model = timm.create_model("test_vit", num_classes=5)
    apply_lora(model, LoRAConfig(bias="lora_only"))
    assert model.blocks[0].attn.qkv.base_layer.bias.requires_grad and not model.blocks[0].mlp.fc1.bias.requires_grad


def test_report_table_and_counts():
    model = timm.create_model("test_vit", num_classes=5)
    report = apply_lora(model, LoRAConfig(r=4))
    text = str(report)
    assert "blocks.0.attn.qkv" in text and "qkv[q,v]" in text and "trainable" in text
    row = report.rows[0]
    dim = model.embed_dim
    assert (row.in_features, row.out_features, row.rank) == (dim, 3 * dim, 4)
    assert row.params == 2 * 4 * dim + 2 * dim * 4
    head = sum(p.numel() for p in model.head.parameters())
    assert report.trainable_params == report.lora_params + head
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_glob_regex_and_suffix_patterns():
    model = timm.create_model("test_vit")
    cfg = LoRAConfig(
        target_modules=["blocks.0.attn.qkv", "re:blocks\\.1\\.mlp\\.fc[12]", "proj"],
        exclude_modules=["patch_embed.proj"],
    )
    names = resolve_targets(model, cfg)
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.fc1" in names and "blocks.1.mlp.fc2" in names
    assert "blocks.0.attn.proj" in names and "patch_embed.proj" not in names and "blocks.1.attn.qkv" not in names


def test_k_by_k_conv_targets_and_qkv_all_slices():
    model = timm.create_model("test_resnet", num_classes=3)
    report = apply_lora(model, LoRAConfig(target_modules=["layer3.0.conv2"]))
    assert report.rows[0].kind == "conv3x3"
    vit = timm.create_model("test_vit", num_classes=3)
    report = apply_lora(vit, LoRAConfig(qkv_slices="qkv"))
    assert report.rows[0].kind == "qkv[q,k,v]"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(target_modules=["blocks.*.attn.qvk"]), r"matches no module.*blocks\.\d\.attn\.qkv"),
        (dict(target_modules=["blocks.0.attn"]), "container module.*blocks.0.attn.qkv"),
        (dict(target_modules=["blocks.0.norm1"]), "LayerNorm, which LoRA cannot adapt"),
        (dict(target_modules=["head"]), "classifier head"),
        (dict(target_modules=["preset:nope"]), "Unknown LoRA preset"),
        (dict(r=65), "rank r=65 exceeds"),
    ],
)
def test_bad_targets_raise_before_anything_changes(config, match):
    model = timm.create_model("test_vit", num_classes=5)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_lora(model, LoRAConfig(**config))
    assert not lora_layers(model)
    assert list(model.state_dict()) == list(snapshot)
    assert all(p.requires_grad for p in model.parameters())


def test_depthwise_conv_target_is_refused_by_name():
    model = timm.create_model("test_efficientnet")
    with pytest.raises(ValueError, match=r"blocks\.3\.0\.conv_dw' is a grouped/depthwise conv"):
        apply_lora(model, LoRAConfig(target_modules=["blocks.3.0.conv_dw"]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=0), "rank"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_alpha=-1), "lora_alpha"),
        (dict(qkv_slices="qx"), "qkv_slices"),
        (dict(bias="some"), "bias"),
        (dict(lora_dropout=1.0), "dropout"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_applying_twice_is_refused():
    model = timm.create_model("test_vit")
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, LoRAConfig())


def test_unsupported_module_type_is_refused():
    model = timm.create_model("test_vit")
    with pytest.raises(ValueError, match="Dropout, which LoRA cannot adapt"):
        apply_lora(model, LoRAConfig(target_modules=["blocks.0.attn.attn_drop"]))


@pytest.mark.parametrize("arch", ["beit_base_patch16_224", "eva02_tiny_patch14_224", "swinv2_tiny_window8_256"])
def test_adapter_changes_attention_that_reads_qkv_weight_directly(arch):
    """BEiT, EVA and SwinV2 call F.linear(x, self.qkv.weight, q_bias ⊕ v_bias): the wrapper's `weight` carries the
    update, so the adapter changes (and trains) these models, and merging gives the same output."""
    kwargs = dict(num_classes=3, img_size=32, embed_dim=32, num_heads=2)
    if arch.startswith("swinv2"):
        kwargs.update(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    else:
        kwargs.update(patch_size=8, depth=2)
    model = timm.create_model(arch, **kwargs).eval()
    for m in model.modules():  # SwinV2 zero-inits its res-post-norm, which would hide the attention branch
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
    qkv_attn = [m for m in model.modules() if getattr(m, "q_bias", None) is not None]
    assert qkv_attn, "this model should use the q_bias / F.linear path"
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        before = model.forward_features(x)
    apply_lora(model, LoRAConfig(r=2, lora_alpha=4))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    model.train()
    model(x).sum().backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in lora_layers(model).values())
    model.eval()
    with torch.no_grad():
        adapted = model.forward_features(x)
        # An independent reference: the base model with W + ΔW written into each qkv weight by hand.
        for name, layer in lora_layers(model).items():
            reference.get_submodule(name).weight.add_(layer.delta_weight())
        expected = reference.forward_features(x)
        merged = merge_lora(model).forward_features(x)
    assert not torch.allclose(adapted, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_lora_parameters_are_named_lora():
    model = timm.create_model("test_convnext")
    apply_lora(model, LoRAConfig())
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            own = [n for n, _ in module.named_parameters() if not n.startswith("base_layer.")]
            assert own and all(n.startswith("lora_") for n in own), name


# Families nobody wrote a preset for: what the structure-based default must pick (a sample) and never pick.
STRUCTURE = {
    "pvt_v2_b0": (["stages.0.blocks.0.attn.q", "stages.0.blocks.0.attn.kv"], ["stages.0.blocks.0.mlp.fc1", "head"]),
    "levit_128s": (
        ["stages.0.blocks.0.attn.qkv.linear", "stages.1.downsample.attn_downsample.kv.linear"],
        ["stages.0.blocks.0.attn.proj.ln.linear", "stem.conv1.linear", "head.linear", "head_dist.linear"],
    ),
    "mixer_s16_224": (["blocks.0.mlp_tokens.fc1", "blocks.7.mlp_channels.fc2"], ["stem.proj", "head"]),
    "resmlp_12_224": (["blocks.0.linear_tokens", "blocks.0.mlp_channels.fc1"], ["stem.proj", "head"]),
    "efficientformer_l1": (
        ["stages.0.blocks.0.mlp.fc1", "stages.3.blocks.0.mlp.fc2", "stages.3.blocks.4.token_mixer.qkv"],
        ["stem.conv1", "stages.3.blocks.4.mlp.fc1", "head", "head_dist"],
    ),
    "resnetv2_18": (["stages.0.blocks.0.conv1", "stages.3.blocks.1.conv2"], ["stem.conv", "head.fc"]),
}


@pytest.mark.parametrize("name", STRUCTURE)
def test_default_adapts_families_without_a_named_preset(name):
    model = timm.create_model(name, num_classes=3)
    report = apply_lora(model, LoRAConfig())
    adapted = {row.name for row in report.rows}
    must, never = STRUCTURE[name]
    assert set(must) <= adapted, set(must) - adapted
    assert not adapted & set(never)
    stages = [f["module"] for f in model.feature_info if f["module"].startswith(("stages.", "blocks."))]
    assert all(any(n.startswith(stage + ".") for n in adapted) for stage in stages), "a stage without an adapter"


@pytest.mark.parametrize("name", ["fastvit_t8", "mobileone_s0"])
def test_preset_skips_layers_that_cannot_take_the_rank_and_lists_them(name):
    model = timm.create_model(name, num_classes=3)
    report = apply_lora(model, LoRAConfig(r=8))
    skipped = dict(report.skipped)
    stem = next(n for n in skipped if n.startswith("stem"))
    assert "input image" in skipped[stem] and "skipped: " + stem in str(report)
    assert any("grouped/depthwise" in why for why in skipped.values())
    assert not {row.name for row in report.rows} & set(skipped)
    for explicit in ([stem], ["preset:auto", stem]):  # a name given explicitly is never skipped
        with pytest.raises(ValueError, match="rank r=8 exceeds"):
            apply_lora(timm.create_model(name, num_classes=3), LoRAConfig(r=8, target_modules=explicit))


def test_fused_projection_of_unknown_layout_gets_one_lora_and_a_note():
    model = timm.create_model("coatnet_nano_rw_224", num_classes=3)  # maxxvit Attention2d: a 1×1 conv qkv
    report = apply_lora(model, LoRAConfig())
    rows = {row.name: row for row in report.rows}
    assert rows["stages.3.blocks.0.attn.qkv"].kind == "conv1x1"
    assert "layout is unknown" in rows["stages.3.blocks.0.attn.qkv"].note and "note: stages.3" in str(report)


def test_describe_targets_lists_the_preset_before_training(capsys):
    from vision_lora.inject import describe_targets, main

    text = describe_targets("levit_128s")
    assert "stages.0.blocks.0.attn.qkv.linear" in text and "4x[q16|k16|v32]" in text and "head.linear" in text
    main(["pvt_v2_b0", "--r", "4"])
    assert "stages.0.blocks.0.attn.kv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["test_vit", "--target_modules", "nope"])
    assert "matches no module" in capsys.readouterr().err
