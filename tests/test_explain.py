"""Grad-CAM: the map of a model whose answer is known peaks on the evidence; ViT tokens go back on the patch grid; no
parameter gradient or mode is touched; LoRA base layers are refused; `vision-lora explain` writes overlays."""

from __future__ import annotations

import timm
import torch
from torch import nn

from vision_lora.cli import main
from vision_lora.errors import VisionLoRAError
from vision_lora.explain import cam_layer, grad_cam
from vision_lora.lora.config import LoRAConfig
from vision_lora.lora.inject import apply_lora


class _Evidence(nn.Module):
    """Class 1's logit is the mean of input channel 0, class 0's of channel 1: the evidence of class 1 is where
    channel 0 is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0] = 1.0
            self.features.weight[1, 1] = 1.0
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_the_map_peaks_inside_the_evidence_patch():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(20, 3, 32, 32, generator=generator) * 0.1
    boxes = torch.randint(0, 24, (20, 2), generator=generator)
    for image, (y, x) in zip(images, boxes.tolist(), strict=True):
        image[0, y : y + 8, x : x + 8] = 1.0
    maps = grad_cam(_Evidence(), images, torch.ones(20, dtype=torch.long), layer="features")
    assert maps.shape == (20, 32, 32) and float(maps.min()) >= 0.0 and float(maps.amax()) <= 1.0
    peaks = maps.flatten(1).argmax(1)
    for peak, (y, x) in zip(peaks.tolist(), boxes.tolist(), strict=True):
        assert y <= peak // 32 < y + 8 and x <= peak % 32 < x + 8


def test_a_lora_vit_maps_on_its_patch_grid_without_touching_gradients_or_mode():
    model = timm.create_model("test_vit", num_classes=3)
    apply_lora(model, LoRAConfig(r=4))
    model.eval()
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    name, _ = cam_layer(model)
    assert name == f"blocks.{len(model.blocks) - 1}.norm1"
    maps = grad_cam(model, images)
    assert maps.shape == (2, *model.patch_embed.img_size) and not model.training
    assert all(p.grad is None for p in model.parameters())
    qkv = next(n for n, _ in model.named_modules() if n.endswith("qkv.base_layer"))
    try:
        cam_layer(model, qkv)
    except VisionLoRAError as err:
        assert "base layer" in str(err)
    else:
        raise AssertionError("a base_layer must be refused")


def test_explain_writes_an_overlay_per_image(image_folder, backbone_file, tmp_path, monkeypatch, capsys):
    from helpers import FAST

    monkeypatch.chdir(tmp_path)
    weights = f"--model.weights={backbone_file('test_resnet')}"
    main(["fit", *FAST, weights, f"--data.root={image_folder}", "--trainer.max_epochs=1", "--recipe=off"])
    adapter = tmp_path / "runs" / "lightning_logs" / "version_0" / "adapter"
    main(["explain", "--adapter", str(adapter), "--images", str(image_folder / "test"), "--output", "cams"])
    written = sorted((tmp_path / "cams").glob("*.cam.png"))
    assert len(written) == 12 and (tmp_path / "cams" / "green__0.cam.png").stat().st_size > 500
    assert capsys.readouterr().out.count("\t") == 2 * 12
