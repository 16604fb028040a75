"""Exactness of the conv LoRA kernel that takes the adapter gradients from the weight gradient (`folded_conv2d`):
float64 gradcheck, and float32 equality with plain autograd through the unfused formula base(x) + s·B(A(x))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from vision_lora import LoRAConv2d
from vision_lora.lora.kernels import folded_conv2d, weight_gradient_is_cheaper

CONVS = {
    "1x1": lambda c: nn.Conv2d(c, c + 2, 1, bias=False),
    "1x1-bias": lambda c: nn.Conv2d(c, c + 2, 1),
    "3x3-stride2-pad1": lambda c: nn.Conv2d(c, c + 2, 3, stride=2, padding=1),
    "3x3-dilation2": lambda c: nn.Conv2d(c, c + 2, 3, padding=2, dilation=2, bias=False),
    "same-3x3-stride2": lambda c: Conv2dSame(c, c + 2, 3, stride=2),
}


def _layer(make, channels=6, dtype=torch.float32, channels_last=False) -> LoRAConv2d:
    torch.manual_seed(0)
    layer = LoRAConv2d(make(channels).to(dtype), r=2, lora_alpha=6).train()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    assert layer._fold_conv
    if channels_last:
        layer.to(memory_format=torch.channels_last)
    return layer


def _unfused(layer: LoRAConv2d, x):
    """The reference: plain autograd through base(x) + s·B(A(x)), two convs, no custom backward."""
    lora = F.conv2d(layer._conv(x, layer.lora_A, None), layer.lora_B) * layer.scaling
    return layer.base_layer(x) + lora


def _grads(layer: LoRAConv2d, x, forward):
    tensors = [x, layer.lora_A, layer.lora_B] + ([layer.base_layer.bias] if layer.base_layer.bias is not None else [])
    for t in tensors:
        t.grad = None
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("name", list(CONVS))
def test_folded_conv_gradcheck_float64(name):
    layer = _layer(CONVS[name], channels=3, dtype=torch.float64)
    base = layer.base_layer
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    if isinstance(base, Conv2dSame):
        from timm.layers.padding import pad_same

        x = pad_same(x, base.kernel_size, base.stride, base.dilation).detach().requires_grad_(True)
    bias = None if base.bias is None else base.bias.detach().clone().requires_grad_(True)
    geometry = (tuple(base.stride), tuple(base.padding), tuple(base.dilation))

    def f(x, weight, bias, a, b):
        return folded_conv2d(x, weight, bias, a, b, layer.scaling, *geometry)

    weight = base.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, weight, bias, layer.lora_A, layer.lora_B), fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("name", list(CONVS))
def test_folded_conv_equals_unfused_autograd_in_float32(name, channels_last):
    layer = _layer(CONVS[name], channels_last=channels_last)
    x = torch.randn(3, 6, 11, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, fast = _grads(layer, x, layer)
    y_ref, ref = _grads(layer, x, lambda x: _unfused(layer, x))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_folded_conv_under_no_grad_checkpointing_and_bf16_autocast():
    layer = _layer(CONVS["3x3-stride2-pad1"])
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _unfused(layer, x), rtol=1e-5, atol=1e-5)
    y, fast = _grads(layer, x, lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False))
    _, ref = _grads(layer, x, lambda x: _unfused(layer, x))
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()


def test_dropout_and_dora_keep_their_own_paths():
    """Dropout on the adapter input only, and DoRA's rescale, do not fit a folded weight: those layers train as
    before, and still match the unfused formula in eval mode."""
    drop = LoRAConv2d(nn.Conv2d(6, 10, 1), r=3, lora_alpha=6, lora_dropout=0.5).train()
    dora = LoRAConv2d(nn.Conv2d(6, 10, 1), r=3, lora_alpha=6, use_dora=True).train()
    x = torch.randn(2, 6, 5, 5)
    for layer in (drop, dora):
        layer(x).sum().backward()
        assert layer.lora_A.grad is not None
    drop.eval()
    torch.testing.assert_close(drop(x), _unfused(drop, x), rtol=1e-5, atol=1e-5)


def test_weight_gradient_rule_prefers_g_for_narrow_layers_only():
    assert weight_gradient_is_cheaper(16, 96, 8)
    assert weight_gradient_is_cheaper(1024, 1024, 8)
    assert not weight_gradient_is_cheaper(2048, 2048, 8)
    assert not weight_gradient_is_cheaper(2048, 2048, 1)
