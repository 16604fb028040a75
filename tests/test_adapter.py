from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vision_lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, save_merged
from vision_lora.lora import lora_layers


def _base(name, num_classes=4):
    torch.manual_seed(1)  # the same random "pretrained" backbone every time
    return timm.create_model(name, num_classes=num_classes).eval()


def _adapted(name="test_vit", num_classes=4, **config):
    model = _base(name, num_classes)
    apply_lora(model, LoRAConfig(**config))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
        model.get_classifier().weight.normal_()
    return model.eval()


def _x(model):
    return torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet", "test_resnet"])
def test_adapter_round_trip_reproduces_logits(tmp_path, name):
    model = _adapted(name, train_norm=False, bias="lora_only" if name == "test_vit" else "none")
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path / "adapter", class_names=["a", "b", "c", "d"])
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["model_name"] == name and info["num_classes"] == 4 and info["class_names"] == ["a", "b", "c", "d"]
    assert info["lora_config"]["r"] == 8 and "torch" in info["versions"]
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    head = {n for n in tensors if "lora_" not in n}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == trainable
    assert all(n.startswith(("head.", "classifier.", "fc.")) or n.endswith("base_layer.bias") for n in head)

    fresh = load_adapter(_base(name), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


def test_adapter_with_trained_norms_keeps_their_statistics(tmp_path):
    model = _adapted("test_resnet", train_norm=True)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # moves BatchNorm running stats
    model.eval()
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path)
    fresh = load_adapter(_base("test_resnet"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


def test_load_adapter_checks_backbone_and_head(tmp_path):
    save_adapter(_adapted("test_vit"), tmp_path)
    with pytest.raises(ValueError, match="trained on 'test_vit', not 'test_vit2'"):
        load_adapter(timm.create_model("test_vit2", num_classes=4), tmp_path)
    with pytest.raises(ValueError, match="num_classes=4"):
        load_adapter(timm.create_model("test_vit", num_classes=7), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(timm.create_model("test_vit", num_classes=4), tmp_path / "missing")


def test_load_adapter_refuses_tampered_weights(tmp_path):
    save_adapter(_adapted("test_vit"), tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="does not match its config"):
        load_adapter(timm.create_model("test_vit", num_classes=4), tmp_path)


def test_save_adapter_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(timm.create_model("test_vit"), tmp_path)


@pytest.mark.parametrize(("name", "suffix"), [("test_vit", ".safetensors"), ("tf_efficientnet_lite0", ".pth")])
def test_merged_checkpoint_loads_in_plain_timm_without_vision_lora(tmp_path, name, suffix):
    model = _adapted(name, num_classes=3)
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
    path = save_merged(model, tmp_path / f"merged{suffix}")
    assert lora_layers(model), "save_merged must not change the model"
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, timm\n"
        f"m = timm.create_model({name!r}, num_classes=3, checkpoint_path={str(path)!r}).eval()\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(k.startswith('vision_lora') for k in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_returns_plain_model_with_same_logits():
    model = _adapted("test_convnext", num_classes=3)
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
        plain = merge_lora(model)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    reference = timm.create_model("test_convnext", num_classes=3)
    assert plain.state_dict().keys() == reference.state_dict().keys()
