"""Where q, k and v sit in a fused projection (`QKVLayout`), and the autograd kernels of LoRA / DoRA that fold the
update into the weight for the forward:

* `sliced_linear`: a Linear whose update is split into row slices (one slice for a plain Linear); the adapter gradients
  are formed from thin rank-r GEMMs, never from zero blocks.
* `folded_conv2d`: a Conv2d; the adapter gradients come from the conv's weight gradient G = gᵀ·x, one pass over the
  output gradient and the input (`convolution_backward` computes it beside the input gradient), instead of four thin
  passes. `weight_gradient_is_cheaper` is the rule that picks between the two for a memory-bound layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["QKVLayout", "folded_conv2d", "sliced_linear", "weight_gradient_is_cheaper"]


@dataclass(frozen=True)
class QKVLayout:
    """Where q, k and v sit in the output rows of a fused projection: `groups` consecutive groups of [q | k | v],
    q, k and v of sizes `q`, `k`, `v` rows in each group.

    timm's ViT, Swin, BEiT, EVA ... lay out [all q | all k | all v]: `QKVLayout(1, d, d, d)`. TinyViT, EfficientFormer,
    LeViT and the head-first maxxvit attention interleave q, k, v per head: `QKVLayout(heads, key_dim, key_dim,
    val_dim)`.
    """

    groups: int
    q: int
    k: int
    v: int

    @classmethod
    def thirds(cls, out_features: int) -> QKVLayout:
        return cls(1, out_features // 3, out_features // 3, out_features // 3)

    @property
    def out_features(self) -> int:
        return self.groups * (self.q + self.k + self.v)

    @property
    def is_thirds(self) -> bool:
        return self.groups == 1 and self.q == self.k == self.v

    def span(self, part: str) -> tuple[int, int]:
        """(offset, size) of `part` ("q", "k" or "v") inside one group."""
        sizes = {"q": self.q, "k": self.k, "v": self.v}
        return sum(sizes[c] for c in "qkv"[: "qkv".index(part)]), sizes[part]

    def rows(self, part: str) -> Tensor:
        """The output rows of `part`, in the order the per-slice B stacks them (group-major)."""
        off, size = self.span(part)
        width = self.q + self.k + self.v
        return (torch.arange(self.groups)[:, None] * width + off + torch.arange(size)).flatten()

    def __str__(self) -> str:
        if self.is_thirds:
            return "[q|k|v]"
        return f"{self.groups}x[q{self.q}|k{self.k}|v{self.v}]"


def _slice_rows(groups: int, width: int, spans: tuple[tuple[int, int], ...], device=None) -> Tensor:
    """The output rows of the adapted slices, slice-major and group-major (the row order of the stacked B)."""
    return torch.cat(
        [
            (torch.arange(groups, device=device)[:, None] * width + off + torch.arange(d, device=device)).flatten()
            for off, d in spans
        ]
    )


def _fold(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int, spans: tuple) -> Tensor:
    """A detached copy of W with s·B_i A_i added to the rows of every slice i: V = W + s·ΔW, (out, in)."""
    w = weight.detach().clone()
    r = lora_A.shape[1]
    bs = lora_B.reshape(-1, r).split([groups * d for _, d in spans])  # (groups·d_i, r) each
    wg = w.view(groups, -1, w.shape[-1])  # (groups, width, in)
    for i, (off, d) in enumerate(spans):
        if groups == 1:
            w[off : off + d].addmm_(bs[i].to(w.dtype), lora_A[i].to(w.dtype), alpha=scaling)
        else:
            delta = bs[i].to(w.dtype) @ lora_A[i].to(w.dtype)  # (groups·d, in)
            wg[:, off : off + d].add_(delta.view(groups, d, -1), alpha=scaling)
    return w


def _adapter_grads(
    g: Tensor, x2: Tensor, lora_A: Tensor, lora_B: Tensor, s: float, groups: int, spans: tuple, c: Tensor | None = None
):
    """(grad A, grad B) of y = c ⊙ x (W + s·ΔW)ᵀ from the output gradient g (N, out) and the input x2 (N, in), both
    in g's dtype; c (R,) scales the adapted rows in B's row order (DoRA; None: 1). Two thin GEMMs over g and two over
    x, never a zero block, and c is applied to B and to grad B (r columns) instead of to g (out columns)."""
    n, r, _ = lora_A.shape
    dt = g.dtype
    a = lora_A.to(dt)
    b = lora_B.to(dt).reshape(-1, r)  # (R, r)
    if c is not None:
        b = b * c.to(dt)[:, None]
    bs = b.split([groups * d for _, d in spans])
    gg = g.view(g.shape[0], groups, -1)  # (N, groups, width)
    # (N, groups·d_i) per adapted slice: views for one group, gathered copies for per-head layouts.
    rows = [gg[:, :, off : off + d].reshape(g.shape[0], groups * d) for off, d in spans]
    h = x2 @ a.reshape(n * r, -1).t()  # (N, S·r)
    gb = torch.cat([rows[i] @ bs[i] for i in range(n)], dim=1)  # (N, S·r)
    grad_A = (gb.t() @ x2).mul_(s).view(n, r, -1)  # (S, r, in)
    grad_B = torch.cat([rows[i].t() @ h[:, i * r : (i + 1) * r] for i in range(n)]).mul_(s)  # (R, r)
    if c is not None:
        grad_B.mul_(c.to(dt)[:, None])
    return grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype).view(lora_B.shape)


class _SlicedLoRALinear(torch.autograd.Function):
    """y = x (W + s·ΔW)ᵀ + b for a Linear whose update ΔW has one B_i A_i block per row slice, trained without a
    second branch.

    The forward runs one GEMM with the update folded into the weight, so the backward's input gradient is one GEMM
    too; the adapter gradients then cost two thin GEMMs over the output gradient and two over the input, and no
    zero blocks (unadapted qkv slices) are ever multiplied. The output rows are `groups` groups of equal width; slice
    i covers rows offset_i : offset_i + d_i of every group (one group: a plain row range, all views). Tensors: x (...,
    in), A (S, r, in), B (Σ groups·d_i, r) in any shape with that many elements (slice i's rows group-major).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, groups: int, spans: tuple[tuple[int, int], ...]):
        w = _fold(weight, lora_A, lora_B, scaling, groups, spans)  # (out, in)
        ctx.save_for_backward(x, weight, lora_A, lora_B, w)
        ctx.scaling, ctx.groups, ctx.spans = scaling, groups, spans
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, w = ctx.saved_tensors
        dt = grad.dtype  # under autocast the output (and its gradient) may be half precision
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        grad_x = (g @ w.to(dt)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ x2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        grad_A, grad_B = _adapter_grads(g, x2, lora_A, lora_B, ctx.scaling, ctx.groups, ctx.spans)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


class _SlicedDoRALinear(torch.autograd.Function):
    """DoRA's y = c ⊙ x Vᵀ + b with V = W + s·ΔW (per slice as in `_SlicedLoRALinear`) and c = m / ‖V‖ on the adapted
    rows (1 elsewhere), the norm a constant in backward.

    One GEMM forward (z = x Vᵀ, kept for the magnitude gradient) and one for the input gradient; the adapter
    gradients are LoRA's with c applied to B (c ⊙ g never formed), and the magnitude's is Σ_N g ⊙ z / ‖V‖. Tensors as in
    `_SlicedLoRALinear`, magnitude (Σ groups·d_i,) in B's row order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling: float, groups: int, spans: tuple):
        w = _fold(weight, lora_A, lora_B, scaling, groups, spans)  # V: (out, in)
        rows = _slice_rows(groups, w.shape[0] // groups, spans, w.device)  # (R,)
        norm = torch.linalg.vector_norm(w[rows], dim=1, dtype=torch.float32)  # ‖V‖ per adapted row, (R,)
        scale = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        scale[rows] = magnitude.detach().float() / norm  # c: (out,)
        z = F.linear(x, w)  # (N, out)
        c = scale.to(z.dtype)
        y = z * c if bias is None else torch.addcmul(bias.to(z.dtype), z, c)
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, w, z, c, norm, rows)
        ctx.scaling, ctx.groups, ctx.spans = scaling, groups, spans
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, magnitude, w, z, c, norm, rows = ctx.saved_tensors
        dt = grad.dtype
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        # The gradient with respect to x Vᵀ is c ⊙ g: c goes onto the (out, in) and (R, r) operands, not onto g.
        c2 = c.to(dt)[:, None]  # (out, 1)
        grad_x = (g @ (w.to(dt) * c2)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None  # g (c ⊙ V)
        grad_w = ((g.t() @ x2) * c2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        grad_A, grad_B = _adapter_grads(g, x2, lora_A, lora_B, ctx.scaling, ctx.groups, ctx.spans, c[rows])
        grad_m = ((g * z.to(dt)).sum(0, dtype=torch.float32)[rows] / norm).to(magnitude.dtype)  # (R,)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, grad_m, None, None, None


def sliced_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scaling: float,
    groups: int,
    spans: tuple,
    magnitude: Tensor | None = None,
) -> Tensor:
    # The Function sees 2-D tensors so that its output is not a view: a view made inside a custom Function may not be
    # modified in place (naflexvit adds its position embedding in place), a view of its output may.
    x2 = x.reshape(-1, x.shape[-1])
    if magnitude is None:
        y = _SlicedLoRALinear.apply(x2, weight, bias, a, b, scaling, groups, spans)
    else:
        y = _SlicedDoRALinear.apply(x2, weight, bias, a, b, magnitude, scaling, groups, spans)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def weight_gradient_is_cheaper(fan_in: int, out: int, r: int) -> bool:
    """Whether a layer's adapter gradients are cheaper from its weight gradient G = gᵀ·x (2·fan_in·out flops per row,
    one pass over g and x) than from four thin rank-r GEMMs (4·r·(fan_in + out) flops per row, two passes over each).

    The thin passes are memory-bound on a CPU, so G wins until its flops outgrow the traffic it saves: while
    fan_in·out / (fan_in + out) (the harmonic mean of the channel counts, halved) stays within `_G_PER_RANK`·r.
    """
    return fan_in * out <= _G_PER_RANK * r * (fan_in + out)


# Threshold of `weight_gradient_is_cheaper`, measured with benchmarks/conv_kernels.py (docs/benchmarks.md).
_G_PER_RANK = 64


class _FoldedLoRAConv2d(torch.autograd.Function):
    """y = conv(x, W + s·B₂A₂) + b with zero padding given as numbers, trained without a second branch.

    The forward is one conv with the update folded into the weight (V), and the backward one `convolution_backward`
    that returns the input gradient (with V, as the frozen layer needs anyway) and the weight gradient G = gᵀ·x
    together, from which the adapter gradients are two tiny matmuls: grad A₂ = s·B₂ᵀ G, grad B₂ = s·G A₂ᵀ. Tensors:
    x (N, in, H, W) in any memory format, W (out, in, kh, kw), A (r, in, kh, kw), B (out, r, 1, 1).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, stride, padding, dilation):
        out, r = weight.shape[0], lora_A.shape[0]
        b2, a2 = lora_B.reshape(out, r).to(weight.dtype), lora_A.reshape(r, -1).to(weight.dtype)
        v = torch.empty_like(weight)  # V in the base weight's memory format
        v.copy_(torch.addmm(weight.reshape(out, -1), b2, a2, alpha=scaling).view(weight.shape))
        ctx.save_for_backward(x, v, lora_A, lora_B)
        ctx.conv = (stride, padding, dilation, bias is not None)
        ctx.scaling = scaling
        return F.conv2d(x, v, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, v, lora_A, lora_B = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conv
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dt = grad.dtype  # under autocast the output (and its gradient) may be half precision
        mask = [need_x, need_w or need_a or need_b, need_bias]
        bias_sizes = [v.shape[0]] if has_bias else None
        grad_x, g_w, grad_bias = torch.ops.aten.convolution_backward(
            grad, x.to(dt), v.to(dt), bias_sizes, stride, padding, dilation, False, [0, 0], 1, mask
        )
        grad_A = grad_B = None
        if need_a or need_b:
            out, r = v.shape[0], lora_A.shape[0]
            g2 = g_w.reshape(out, -1).to(lora_A.dtype)  # G: (out, in·kh·kw)
            if need_a:
                grad_A = (lora_B.reshape(out, r).t() @ g2).mul_(ctx.scaling).view(lora_A.shape)  # (r, in·kh·kw)
            if need_b:
                grad_B = (g2 @ lora_A.reshape(r, -1).t()).mul_(ctx.scaling).view(lora_B.shape)  # (out, r)
        grad_x = grad_x.to(x.dtype) if need_x else None
        grad_w = g_w.to(v.dtype) if need_w else None
        grad_bias = grad_bias if need_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None, None


def folded_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """conv(x, W + s·B₂A₂) + b (groups 1, zero padding `padding`), the adapter gradients from the weight gradient."""
    return _FoldedLoRAConv2d.apply(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation)
