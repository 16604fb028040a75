"""Grad-CAM: the map of a model whose answer is known peaks on the evidence; ViT tokens go back on the patch grid; no
parameter gradient or mode is touched; LoRA base layers are refused; `vision-lora explain` writes overlays."""

from __future__ import annotations

import shutil

import numpy as np
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
    assert grad_cam(model, torch.randn(1, 3, 64, 48)).shape == (1, 64, 48)  # test_vit takes any size: a 4 x 3 grid
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
    photos = tmp_path / "photos"
    shutil.copytree(image_folder / "test", photos)
    (photos / "green" / "broken.png").write_bytes(b"not an image")  # skipped and named, as predict does
    main(["explain", "--adapter", str(adapter), "--images", str(photos), "--output", "cams"])
    written = sorted((tmp_path / "cams").glob("*.cam.png"))
    assert len(written) == 12 and (tmp_path / "cams" / "green__0.cam.png").stat().st_size > 500
    out, err = capsys.readouterr()
    assert out.count("\t") == 2 * 12 and f"{photos / 'green' / 'broken.png'}\tskipped: not an image" in err


def test_errors_png_carries_the_maps_of_the_inputs_as_seen_without_touching_the_live_module(image_folder, tmp_path):
    """After a fit and a validate, each shown error gets the Grad-CAM map of its predicted class computed from the
    exact network input of that image; the module that trained keeps its mode, gradients and weights."""
    from helpers import quiet_trainer
    from PIL import Image

    from vision_lora import ImageFolderDataModule, LoRAClassifier
    from vision_lora.data.folder import preprocess_files
    from vision_lora.explain import overlay
    from vision_lora.reports import EvalPredictions, write_errors
    from vision_lora.reports_cam import add_cams, cam_maps

    module = LoRAClassifier("test_resnet", num_classes=3, input_size=32, lr=0.0, head_lr=0.002)
    data = ImageFolderDataModule(root=str(image_folder), batch_size=8, num_workers=0, augment="none")
    gather = EvalPredictions()
    trainer = quiet_trainer(callbacks=[gather], max_epochs=1)
    trainer.fit(module, datamodule=data)
    trainer.validate(module, datamodule=data, verbose=False)
    predictions = gather.predictions
    assert len(predictions.images) == len(predictions.inputs) > 0
    module.train()
    module.zero_grad(set_to_none=True)
    modes = {name: m.training for name, m in module.named_modules()}
    weights = {k: v.clone() for k, v in module.state_dict().items()}

    shown, why = add_cams(predictions, module.model)
    assert why is None and shown.cam_note == "Grad-CAM of the predicted class"
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert all(p.grad is None for p in module.parameters())
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)

    positions = sorted(predictions.inputs)
    maps = cam_maps(predictions, module.model)
    module.eval()
    seen = preprocess_files([predictions.keys[p] for p in positions], module.data_config)  # (N, 3, 32, 32)
    again = grad_cam(module.model, seen, torch.tensor([int(predictions.preds[p]) for p in positions]))
    torch.testing.assert_close(torch.from_numpy(np.stack([maps[p] for p in positions])), again)
    for p in positions:
        assert np.array_equal(shown.images[p], overlay(predictions.images[p], maps[p]))
        assert np.abs(shown.images[p].astype(int) - predictions.images[p]).mean() > 5

    _, plain = write_errors(predictions, module.class_names, tmp_path / "a.csv", tmp_path / "plain.png")
    _, drawn = write_errors(shown, module.class_names, tmp_path / "b.csv", tmp_path / "drawn.png")
    assert Image.open(drawn).text["Title"].endswith("; Grad-CAM of the predicted class")
    assert Image.open(plain).size == Image.open(drawn).size
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(drawn)))

    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))  # no feature stage to read: no overlays, one line
    same, why = add_cams(predictions, flat)
    assert same is predictions and why.startswith("VisionLoRAError: This model names no feature stage")


def test_a_multilabel_map_explains_the_most_confident_added_class_else_the_missed_one():
    from vision_lora.reports import Predictions
    from vision_lora.reports_cam import explained_class

    targets = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    scores = np.array([[0.9, 0.6, 0.8, 0.1], [0.2, 0.4, 0.1, 0.3]])
    preds = (scores >= 0.5).astype(np.int64)  # sample 0 adds 1 and 2 (2 the more sure); sample 1 misses 0 and 1
    predictions = Predictions("val", ["a", "b"], targets, preds, scores, thresholds=np.full(4, 0.5))
    assert [explained_class(predictions, 0), explained_class(predictions, 1)] == [2, 0]
