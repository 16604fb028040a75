from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer

from vision_lora import ImageFolderDataModule, LoRAClassifier
from vision_lora.module import lr_factor


def _loss_and_lora_grads(module: LoRAClassifier, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    module.train()
    module.zero_grad()
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_gradient_checkpointing_keeps_lora_gradients(backbone):
    """timm's (non-reentrant) activation checkpointing over a frozen backbone: same loss, same LoRA gradients."""
    torch.manual_seed(0)
    plain = LoRAClassifier(backbone, num_classes=4)
    checkpointed = LoRAClassifier(backbone, num_classes=4, grad_checkpointing=True)
    for layer in plain.model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 160, 160), torch.tensor([0, 3])
    loss, grads = _loss_and_lora_grads(plain, x, y)
    loss_ckpt, grads_ckpt = _loss_and_lora_grads(checkpointed, x, y)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads and grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6)


def test_channels_last_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    plain = LoRAClassifier("test_efficientnet", num_classes=4)
    fast = LoRAClassifier("test_efficientnet", num_classes=4, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    loss, grads = _loss_and_lora_grads(plain, x, y)
    loss_cl, grads_cl = _loss_and_lora_grads(fast, x, y)
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cl[name], grad, rtol=1e-4, atol=1e-6)


def test_an_epoch_of_lightning_training_leaves_the_backbone_bit_identical(image_folder, backbone_file):
    module = LoRAClassifier("test_resnet", weights=backbone_file("test_resnet"), lr=0.05, head_lr=0.05, input_size=32)
    data = ImageFolderDataModule(root=str(image_folder), num_workers=0, batch_size=8)
    module._resize_head(data.num_classes, data.class_names)
    frozen = {k: v.clone() for k, v in module.state_dict().items() if k not in module.trainable_state_keys()}
    trained = {k: v.clone() for k, v in module.state_dict().items() if k in module.trainable_state_keys()}
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, datamodule=data)
    after = module.state_dict()
    assert any("running_mean" in k for k in frozen)
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], v) for k, v in trained.items() if "lora_B" in k)


def test_optimizer_groups_lora_and_head_learning_rates():
    module = LoRAClassifier("test_vit", num_classes=3, lr=1e-3, head_lr=5e-2, weight_decay=0.1)
    groups = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in module.param_groups()}
    lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    head_w, head_b = module.model.head.weight.numel(), module.model.head.bias.numel()
    assert groups == {(1e-3, 0.1): lora, (5e-2, 0.1): head_w, (5e-2, 0.0): head_b}


def test_load_state_dict_accepts_only_frozen_keys_as_missing():
    module = LoRAClassifier("test_vit", num_classes=3)
    trainable = {k: v for k, v in module.state_dict().items() if k in module.trainable_state_keys()}
    module.load_state_dict(trainable)  # the checkpoint form: fine
    lacking = dict(trainable)
    lacking.pop(next(k for k in lacking if "lora_A" in k))
    with pytest.raises(ValueError, match="missing trained keys"):
        module.load_state_dict(lacking)
    with pytest.raises(ValueError, match="unexpected keys"):
        module.load_state_dict({**trainable, "model.blocks.0.extra": torch.zeros(1)})
    wrong = {**trainable, "model.head.weight": torch.zeros(7, module.model.head.in_features)}
    with pytest.raises(ValueError, match="check num_classes"):
        module.load_state_dict(wrong)


def test_mixup_trains_on_timm_soft_targets():
    module = LoRAClassifier("test_resnet", num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    assert module._mixup.num_classes == 4 and module._mixup.label_smoothing == 0.1
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    np.random.seed(0)  # timm's Mixup draws from numpy (and mixes in place)
    loss = module.training_step((x.clone(), y), 0)
    np.random.seed(0)
    mixed, soft = module._mixup(x.clone(), y)
    assert torch.allclose(soft.sum(1), torch.ones(4)) and (soft.max(1).values < 1).all()  # really soft targets
    expected = torch.sum(-soft * F.log_softmax(module(mixed), dim=-1), dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for n, p in module.named_parameters() if "lora_" in n)


def test_val_acc_is_top1_and_balanced_accuracy_sits_beside_it():
    """val_acc is the share of images classified right; on imbalanced data the mean per-class recall differs."""
    module = LoRAClassifier("test_resnet", num_classes=6)
    y = torch.tensor([0] * 12 + [1, 2, 3, 4, 5] * 2)  # 22 images, class 0 dominant
    pred = y.clone()
    pred[:6] = 1  # half of class 0 wrong
    logits = F.one_hot(pred, 6).float()
    module.val_metrics.update(logits, y)
    metrics = {k: v.item() for k, v in module.val_metrics.compute().items()}
    assert metrics["val_acc"] == pytest.approx(16 / 22)
    assert metrics["val_balanced_acc"] == pytest.approx((0.5 + 5 * 1.0) / 6)
    assert set(metrics) == {"val_acc", "val_balanced_acc", "val_f1", "val_acc5"}


def test_rates_never_exceed_one(monkeypatch):
    """A macro average of ones may add up to 1.0000001 in float32; what is logged is clamped to 1."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    monkeypatch.setattr(MulticlassAccuracy, "compute", lambda self: torch.tensor(1.0000001192))
    monkeypatch.setattr(MulticlassF1Score, "compute", lambda self: torch.tensor(1.0000001192))
    module = LoRAClassifier("test_resnet", num_classes=7)
    module.val_metrics.update(torch.eye(7), torch.arange(7))
    assert {k: v.item() for k, v in module.val_metrics.compute().items()} == dict.fromkeys(
        ["val_acc", "val_balanced_acc", "val_f1", "val_acc5"], 1.0
    )


def test_head_warmup_keeps_lora_learning_rate_at_zero_then_warms_it_up():
    assert [lr_factor(s, start=4, total=10, warmup_fraction=0.5) for s in range(4)] == [0.0] * 4
    assert lr_factor(4, start=4, total=10, warmup_fraction=0.5) == pytest.approx(0.01)
    assert lr_factor(7, start=4, total=10, warmup_fraction=0.5) == pytest.approx(1.0)
    assert lr_factor(0, start=0, total=10, warmup_fraction=0.0) == pytest.approx(1.0)
    assert lr_factor(10, start=0, total=10, warmup_fraction=0.0) == pytest.approx(0.0)


def test_head_warmup_of_one_trains_the_head_alone():
    module = LoRAClassifier("test_vit", num_classes=3, head_warmup=1.0)
    trained = {
        n for g in module.param_groups() for n, p in module.model.named_parameters() if any(p is q for q in g["params"])
    }
    assert trained and all(n.startswith("head.") for n in trained)
    with pytest.raises(ValueError, match="head_warmup"):
        LoRAClassifier("test_vit", num_classes=3, head_warmup=1.5)
