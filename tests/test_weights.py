from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from skimage import data

from vision_lora import create_backbone
from vision_lora.preprocess import eval_transform, resolve_data_config


def test_offline_weights_with_a_new_head_keep_the_backbone():
    full = create_backbone("tf_efficientnet_lite0", weights="offline")
    small = create_backbone("tf_efficientnet_lite0", num_classes=10, weights="offline")
    assert small.get_classifier().out_features == 10
    torch.testing.assert_close(small.conv_head.weight, full.conv_head.weight, rtol=0, atol=0)


def test_offline_weights_refuse_other_models():
    with pytest.raises(ValueError, match="No offline weights"):
        create_backbone("test_vit", weights="offline")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown timm model 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        create_backbone("vit_smal_patch16_224")


def test_weights_from_local_file(tmp_path):
    source = timm.create_model("test_vit", num_classes=6)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = create_backbone("test_vit", num_classes=6, weights=str(tmp_path / "w.pth"))
    torch.testing.assert_close(model.state_dict(), source.state_dict(), rtol=0, atol=0)
    relabeled = create_backbone("test_vit", num_classes=3, weights=str(tmp_path / "w.pth"))
    assert relabeled.get_classifier().out_features == 3
    torch.testing.assert_close(relabeled.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_weights_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        create_backbone("test_vit", weights="/nope/w.pth")


def test_pretrained_uses_the_offline_source_where_there_is_one():
    offline = create_backbone("tf_efficientnet_lite0", num_classes=4, weights="offline")
    pretrained = create_backbone("tf_efficientnet_lite0", num_classes=4, weights="pretrained")
    for key, value in offline.state_dict().items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(pretrained.state_dict()[key], value, rtol=0, atol=0)
    # The TensorFlow originals' preprocessing (inputs in [-1, 1], bicubic), as timm's own config says.
    assert pretrained.pretrained_cfg["interpolation"] == "bicubic"
    assert tuple(pretrained.pretrained_cfg["mean"]) == tuple(pretrained.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)


def test_offline_lite0_declared_preprocessing_beats_imagenet_statistics_on_real_photos():
    model = create_backbone("tf_efficientnet_lite0", weights="offline").eval()
    photos = {"chelsea": range(281, 286), "coffee": range(967, 968)}  # ImageNet's cats; espresso
    old = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"}

    def confidence(overrides: dict) -> list[float]:
        transform = eval_transform(resolve_data_config(model, overrides))
        with torch.inference_mode():
            return [
                float(model(transform(Image.fromarray(getattr(data, name)()))[None]).softmax(-1)[0, list(ids)].sum())
                for name, ids in photos.items()
            ]

    declared, imagenet = confidence({}), confidence(old)
    assert min(declared) > 0.9, declared  # the right ImageNet class, confidently
    assert all(d > i for d, i in zip(declared, imagenet, strict=True)), (declared, imagenet)


def test_hub_refuses_a_model_timm_has_no_weights_for():
    with pytest.raises(ValueError, match="no pretrained weights for 'botnet50ts_256'.*weights='random'"):
        create_backbone("botnet50ts_256", weights="hub")
