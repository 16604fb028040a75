"""Many adapters on one backbone (`MultiAdapterModel`): each row of a mixed batch gets the logits of its adapter's own
merged model, for vision_lora and PEFT adapters, LoRA and DoRA, linear / fused-qkv / conv layers; and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize_adapter

from vision_lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from vision_lora.checkpoint import load_model
from vision_lora.deploy.multi import MultiAdapterModel
from vision_lora.preprocess import data_config_record, resolve_data_config
from vision_lora.weights import create_backbone


def make_adapter(
    root: Path,
    name: str,
    weights: Path,
    backbone: str = "test_vit",
    num_classes: int = 3,
    seed: int = 0,
    format: str = "vision_lora",  # noqa: A002
    input_size: int | None = None,
    task_metadata: dict | None = None,
    **config,
) -> Path:
    """An adapter of `backbone` (weights from the file `weights`) with random LoRA B, DoRA magnitudes and head;
    `task_metadata` is what `fit` records for a multi-label model (task, thresholds)."""
    model = create_backbone(backbone, num_classes=num_classes, weights=str(weights))
    apply_lora(model, LoRAConfig(**config))
    randomize_adapter(model, seed, scale=0.1, magnitude=0.2)
    data_config = data_config_record(resolve_data_config(model, {"input_size": input_size} if input_size else None))
    metadata = {"backbone": backbone, "weights": str(weights), "data_config": data_config, **(task_metadata or {})}
    classes = [f"{name}-{i}" for i in range(num_classes)]
    if format == "peft":
        return save_adapter(model, root / name, format="peft")
    return save_adapter(model, root / name, class_names=classes, metadata=metadata)


def merged_logits(directory: Path, x: torch.Tensor, backbone: str, weights: Path) -> torch.Tensor:
    """The logits of the adapter's own merged model (vision_lora: rebuilt as `serve --adapter` does)."""
    if (directory / "adapter.safetensors").is_file():
        model = load_model(adapter=directory).model
    else:
        from safetensors import safe_open  # PEFT files hold their class count in the head tensor only

        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
            rows = next(f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_" not in k and k.endswith("weight"))
        model = load_adapter(create_backbone(backbone, num_classes=rows, weights=str(weights)), directory)
    with torch.inference_mode():
        return merge_lora(model).eval()(x)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vit_adapters(tmp_path_factory, weights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": make_adapter(root, "lora", weights, num_classes=3, seed=1, r=2),
        "dora": make_adapter(root, "dora", weights, num_classes=5, seed=2, r=4, use_dora=True),
        "all_qkv": make_adapter(root, "all_qkv", weights, num_classes=2, seed=3, r=3, qkv_slices="qkv"),
        "mlp": make_adapter(root, "mlp", weights, num_classes=3, seed=6, r=2, target_modules=["mlp.fc1"]),
        "peft": make_adapter(root, "peft", weights, num_classes=4, seed=4, r=2, format="peft"),
        "peft_dora": make_adapter(root, "peft_dora", weights, num_classes=3, seed=5, r=8, use_dora=True, format="peft"),
    }


def test_each_row_of_a_mixed_batch_gets_its_adapters_merged_logits(vit_adapters, weights):
    multi = MultiAdapterModel("test_vit", weights=str(weights))
    for name, directory in vit_adapters.items():
        multi.add_adapter(name, directory)
    names = list(vit_adapters)
    rows = [names[i % len(names)] for i in (0, 1, 2, 3, 4, 5, 4, 0, 2, 1, 3, 0)]  # interleaved, uneven counts
    x = torch.randn(len(rows), 3, 160, 160, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got = multi(x, rows)
    for name, directory in vit_adapters.items():
        want = merged_logits(directory, x, "test_vit", weights)
        for i, row_name in enumerate(rows):
            if row_name == name:
                assert got[i].shape == want[i].shape
                assert _rel(got[i], want[i]) < 1e-4, (name, i, _rel(got[i], want[i]))
    assert multi.adapters["dora"].class_names == [f"dora-{i}" for i in range(5)]
    assert multi.adapters["peft"].class_names == ["0", "1", "2", "3"] and multi.adapters["peft_dora"].rank == 8


def test_conv_adapters_on_a_batchnorm_backbone(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    adapters = {
        "conv": make_adapter(tmp_path, "conv", weights, "test_resnet", num_classes=3, seed=1, r=2),
        "conv_dora": make_adapter(tmp_path, "conv_dora", weights, "test_resnet", 4, seed=2, r=3, use_dora=True),
        "conv_peft": make_adapter(tmp_path, "conv_peft", weights, "test_resnet", 2, seed=3, r=2, format="peft"),
    }
    multi = MultiAdapterModel("test_resnet", weights=str(weights))
    for name, directory in adapters.items():
        multi.add_adapter(name, directory)
    rows = ["conv_dora", "conv", "conv_peft", "conv", "conv_dora"]
    same_rank = ["conv_peft", "conv", "conv", "conv_peft", "conv_peft"]  # LoRA of one rank: stacked without padding
    x = torch.randn(len(rows), 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, got_same_rank = multi(x, rows), multi(x, same_rank)
    for name, directory in adapters.items():
        want = merged_logits(directory, x, "test_resnet", weights)
        assert all(_rel(got[i], want[i]) < 1e-4 for i, n in enumerate(rows) if n == name), name
        assert all(_rel(got_same_rank[i], want[i]) < 1e-4 for i, n in enumerate(same_rank) if n == name), name


def test_replace_remove_and_refusals_leave_the_served_adapters_unchanged(vit_adapters, weights, tmp_path):
    multi = MultiAdapterModel("test_vit", weights=str(weights))
    multi.add_adapter("a", vit_adapters["lora"])
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = multi(x, ["a", "a"])
    other_weights = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit").state_dict(), other_weights)
    resnet_weights = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), resnet_weights)
    refused = {
        "trained on 'test_resnet'": make_adapter(tmp_path, "resnet", resnet_weights, "test_resnet"),
        "backbone weights 'other.pth'": make_adapter(tmp_path, "other_weights", other_weights),
        "preprocessing differs": make_adapter(tmp_path, "size", weights, input_size=64),
        "trains biases": make_adapter(tmp_path, "bias", weights, bias="all"),
        "trains norm layers": make_adapter(tmp_path, "norm", weights, train_norm=True),
    }
    (tmp_path / "pickled").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled" / "adapter_model.bin")
    refused["a pickle format"] = tmp_path / "pickled"
    for reason, directory in refused.items():
        with pytest.raises(ValueError, match=reason):
            multi.add_adapter("a", directory)
    follower = MultiAdapterModel("test_vit", weights=str(weights))  # no preprocessing given: the first adapter's
    follower.add_adapter("small", refused["preprocessing differs"])
    assert follower.data_config["input_size"] == (3, 64, 64)
    with pytest.raises(ValueError, match="preprocessing differs"):
        follower.add_adapter("a", vit_adapters["lora"])
    with pytest.raises(ValueError, match="adapter names are"):
        multi.add_adapter("../a", vit_adapters["dora"])
    with pytest.raises(ValueError, match="over the cap"):
        multi.add_adapter("b", vit_adapters["dora"], max_bytes=1000)
    with torch.inference_mode():
        torch.testing.assert_close(multi(x, ["a", "a"]), before, rtol=0, atol=0)
        assert not any(p.requires_grad for p in multi.parameters())
        multi.add_adapter("a", vit_adapters["dora"])  # re-adding replaces
        assert multi(x, ["a", "a"])[0].shape == (5,)
    multi.remove_adapter("a")
    with pytest.raises(KeyError, match="not loaded"):
        multi(x, ["a", "a"])
