"""LoRA layers: y = base(x) + s · B(A(dropout(x))) for Linear, fused qkv Linear and Conv2d; merge / unmerge.

Every adapter parameter is named `lora_*` (`lora_A`, `lora_B`, and DoRA's `lora_magnitude`); the frozen original layer
is kept as `base_layer`. Each layer writes its update as a product of two matrices, ΔW = s · B₂ A₂ (`_factors`), from
which the merged weight, the eval-mode folded weight and the rank all follow.

DoRA (weight-decomposed LoRA, `use_dora=True`) rescales every adapted output row of V = W + s·B·A to a learned length:
W' = m · V / ‖V‖, the norm taken over all but the output axis and treated as a constant in backward (DoRA §4.3, as in
PEFT). m starts at ‖W‖, so a fresh layer computes the base layer exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from timm.layers.padding import pad_same
from torch import Tensor, nn

from ..errors import VisionLoRAError
from .kernels import QKVLayout, folded_conv2d, sliced_linear, weight_gradient_is_cheaper

__all__ = ["LoRALayer", "LoRALinear", "LoRAQKVLinear", "LoRAConv2d", "QKVLayout", "dora_norm", "lora_scaling"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor s that multiplies B·A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _init_lora_A(weight: Tensor, fan_in: int) -> None:
    # Like nn.Linear's default init (kaiming-uniform, a=sqrt(5)): uniform in ±1 / sqrt(fan_in).
    nn.init.uniform_(weight, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


def _factory(base_layer: nn.Module) -> dict:
    return {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}


def dora_norm(weight: Tensor, rows: Tensor | None = None) -> Tensor:
    """‖W‖ per output row (of `rows`, all when None), over all but the output axis, computed in float32 and returned
    in the weight's dtype: the magnitude a fresh DoRA layer starts from.

    Raises:
        VisionLoRAError: a norm does not fit the weight's dtype (an fp16 / bf16 overflow).
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    if rows is not None:
        w = w[rows]
    norm = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)  # (rows,)
    cast = norm.to(weight.dtype)
    if not torch.isfinite(cast).all():
        raise VisionLoRAError(
            f"DoRA needs the row norms of a {weight.dtype} weight of shape {tuple(weight.shape)}, and one overflows "
            f"{weight.dtype} (largest {norm.max().item():.4g}); nothing was changed. Load the model in float32 "
            f"(model.float()) or use plain LoRA (use_dora=False)."
        )
    return cast


class LoRALayer(nn.Module):
    """Common state of a LoRA-wrapped layer: the frozen `base_layer`, rank, scaling, dropout, DoRA's magnitude and
    the merged flag.

    Subclasses create `lora_A` / `lora_B` (then call `_init_magnitude`) and implement `_factors` and
    `_forward_train`. In eval mode the update is folded into the weight (one GEMM or conv instead of two branches);
    without autograd that folded weight is cached until a parameter changes.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise VisionLoRAError(f"LoRA rank r must be >= 1, got {r}.")
        if lora_alpha <= 0:
            raise VisionLoRAError(f"lora_alpha must be > 0, got {lora_alpha}.")
        if not 0.0 <= lora_dropout < 1.0:
            raise VisionLoRAError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        # No module at all at p=0: dropout would cost a copy of the input for nothing.
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_magnitude: nn.Parameter | None = None
        self.merged = False
        self._unmerged_weight: Tensor | None = None
        self._fold_cache: tuple[tuple, Tensor] | None = None

    def _init_magnitude(self) -> None:
        """DoRA: m = ‖W‖ of every adapted output row, so that the fresh layer computes the base layer."""
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(dora_norm(self.base_layer.weight, self._dora_rows()))

    def __getattr__(self, name: str):
        # Attributes of the wrapped layer (in_features, kernel_size, ...) stay readable through the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- the update --------------------------------------------------------------------------------------------------

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(B₂, A₂) with ΔW = s · B₂ @ A₂ reshaped like the base weight: B₂ (out, k), A₂ (k, fan_in)."""
        raise NotImplementedError

    def _dora_rows(self) -> Tensor | None:
        """The output rows DoRA rescales, in `lora_magnitude`'s order; None: all rows in order."""
        return None

    def delta_weight(self) -> Tensor:
        """s·B·A shaped like the base weight."""
        b, a = self._factors()
        return (b @ a * self.scaling).view_as(self.base_layer.weight)

    def _effective_weight(self, w: Tensor, b: Tensor, a: Tensor, magnitude: Tensor | None) -> Tensor:
        """W + s·B·A; with DoRA, m · V / ‖V‖ on the adapted rows of V = W + s·B·A, the norm a constant. Computed in
        the dtype of the arguments, differentiable in A, B and m."""
        v = torch.addmm(w.reshape(w.shape[0], -1), b, a, alpha=self.scaling)  # V: (out, fan_in)
        if magnitude is None:
            return v.view_as(w)
        rows = self._dora_rows()
        vr = v if rows is None else v[rows]  # (R, fan_in)
        norm = torch.linalg.vector_norm(vr.detach(), dim=1, dtype=torch.float32)  # (R,)
        c = (magnitude.to(torch.float32) / norm).to(v.dtype)[:, None]  # (R, 1)
        return (vr * c if rows is None else v.index_copy(0, rows, vr * c)).view_as(w)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def weight(self) -> Tensor:
        """The effective weight W + s·B·A (DoRA: m · V / ‖V‖), differentiable in the adapter parameters.

        Code that bypasses the module call and reads `.weight` directly (timm's BEiT, EVA and SwinV2 attention call
        `F.linear(x, self.qkv.weight, bias)`) therefore still trains and runs the adapter.
        """
        w = self.base_layer.weight
        if self.merged:
            return w
        return self._effective_weight(w, *self._factors(), self.lora_magnitude)

    def _folded_weight(self) -> Tensor:
        """`weight`, cached while autograd is off and no parameter has changed since it was computed."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.weight
        # Read from the module's dicts: nn.Module.__getattr__ costs about a microsecond a call, on every adapted layer
        # of every eval forward.
        base, own = self._modules["base_layer"], self._parameters
        w = base._parameters.get("weight")
        w = base.weight if w is None else w
        a, b, m = own["lora_A"], own["lora_B"], own.get("lora_magnitude")
        key = (w._version, a._version, b._version, w.data_ptr(), a.data_ptr(), b.data_ptr(), self.merged)
        if m is not None:
            key += (m._version, m.data_ptr())
        cache = self._fold_cache
        if cache is None or cache[0] != key:
            cache = self._fold_cache = (key, self.weight)
        return cache[1]

    # -- forward -----------------------------------------------------------------------------------------------------

    def _forward_train(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward_folded(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.training:
            self._fold_cache = None
            return self._forward_train(x)
        return self._forward_folded(x, self._folded_weight())

    def _dora_scale(self) -> Tensor:
        """c = m / ‖V‖ for every output row (1 on rows DoRA does not adapt), the norm a constant: (out,)."""
        w = self.base_layer.weight
        b, a = self._factors()
        with torch.no_grad():
            v = torch.addmm(w.reshape(w.shape[0], -1), b, a, alpha=self.scaling)  # (out, fan_in)
            rows = self._dora_rows()
            norm = torch.linalg.vector_norm(v if rows is None else v[rows], dim=1, dtype=torch.float32)
        c = self.lora_magnitude.to(torch.float32) / norm  # (R,)
        return c if rows is None else torch.ones(w.shape[0], device=w.device).index_copy(0, rows, c)

    # -- merge -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + s·B·A (DoRA: m · V / ‖V‖) computed in float32 whatever the weight dtype, cast once to the weight dtype.

        Raises:
            VisionLoRAError: the result is not finite in the weight's dtype (for example an fp16 overflow).
        """
        w = self.base_layer.weight
        if self.merged:
            return w.detach().clone()
        b, a = self._factors()
        m = self.lora_magnitude.float() if self.lora_magnitude is not None else None
        merged = self._effective_weight(w.float(), b.float(), a.float(), m)
        merged_cast = merged.to(w.dtype)
        if not torch.isfinite(merged_cast).all():
            what = "overflows" if torch.isfinite(merged).all() else "is not finite"
            raise VisionLoRAError(
                f"Merging LoRA into a {w.dtype} weight of shape {tuple(w.shape)} {what}; the base weight was left "
                f"unchanged. Merge in float32 (model.float()) or check the adapter for inf/NaN values."
            )
        return merged_cast

    @torch.no_grad()
    def merge(self) -> None:
        """Write the effective weight into the base weight, so the layer costs exactly what the base layer costs.

        The original weight is kept so that `unmerge` restores it bit for bit. A no-op when already merged.

        Raises:
            VisionLoRAError: the merged weight is not finite in the weight's dtype; nothing is changed then.
        """
        if self.merged:
            return
        merged = self.merged_weight()
        self._unmerged_weight = self.base_layer.weight.detach().clone()
        self.base_layer.weight.copy_(merged)
        self.merged = True
        self._fold_cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight. A no-op when not merged."""
        if not self.merged:
            return
        assert self._unmerged_weight is not None
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}{dora}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA around an `nn.Linear`: A (r, in), B (out, r); with DoRA a magnitude (out,)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        out_f, in_f = base_layer.weight.shape
        if r > min(in_f, out_f):
            raise VisionLoRAError(
                f"LoRA rank r={r} exceeds min(in, out) = {min(in_f, out_f)} of a {in_f}->{out_f} Linear."
            )
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **_factory(base_layer)))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **_factory(base_layer)))
        _init_lora_A(self.lora_A, in_f)
        self._init_magnitude()

    @property
    def kind(self) -> str:
        return "linear+dora" if self.use_dora else "linear"

    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A

    def _forward_folded(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self._modules["base_layer"]._parameters.get("bias"))  # dict reads, see above

    def _forward_train(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if isinstance(self.lora_dropout, nn.Identity):
            spans = ((0, base.out_features),)
            a, b = self.lora_A[None], self.lora_B[None]
            return sliced_linear(x, base.weight, base.bias, a, b, self.scaling, 1, spans, self.lora_magnitude)
        return _two_branch_linear(self, x)


def _two_branch_linear(layer: LoRALayer, x: Tensor) -> Tensor:
    """The training forward with dropout on the adapter input: base(x) + s·B A x̃, and with DoRA (as in PEFT)
    base(x) + (c - 1) ⊙ W x̃ + c ⊙ s·B A x̃, x̃ = dropout(x)."""
    out = layer.base_layer(x)  # (..., out)
    b, a = layer._factors()
    xd = layer.lora_dropout(x)
    h = F.linear(xd, a)  # (..., k)
    if not layer.use_dora:
        # out + s · h @ Bᵀ as one fused GEMM.
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=layer.scaling)
        return flat.view(out.shape)
    c = layer._dora_scale().to(out.dtype)  # (out,)
    return out + (c - 1) * F.linear(xd, layer.base_layer.weight) + c * F.linear(h, b) * layer.scaling


class LoRAQKVLinear(LoRALayer):
    """LoRA around a fused attention projection (timm `Attention.qkv`) that adapts a chosen subset of the q, k and v
    slices, each with its own A (r, in) and B (rows of that slice, r); unselected slices get an update of exactly 0.

    Which output rows are q, k and v is given by `layout` (default: [all q | all k | all v] in thirds). `lora_A` is
    (S, r, in) for the S selected slices in q, k, v order; `lora_B` is (S, d, r) when the selected slices have d rows
    each, else (Σ d_i, r) with the slices stacked, each slice's rows in layout order (group-major). With DoRA,
    `lora_magnitude` (Σ d_i,) holds a length for each adapted row in B's row order; unadapted rows stay exactly W.
    Training runs one GEMM with the update folded into the weight.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        slices: str = "qv",
        layout: QKVLayout | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        out_f, in_f = base_layer.weight.shape
        if layout is None:
            if out_f % 3:
                raise VisionLoRAError(f"A fused qkv Linear needs out_features divisible by 3, got {out_f}.")
            layout = QKVLayout.thirds(out_f)
        if layout.out_features != out_f:
            raise VisionLoRAError(f"qkv layout {layout} covers {layout.out_features} rows, the Linear has {out_f}.")
        if not slices or set(slices) - set("qkv") or len(set(slices)) != len(slices):
            raise VisionLoRAError(f"qkv slices must be a non-empty subset of 'qkv' such as 'qv', got {slices!r}.")
        self.slices = "".join(c for c in "qkv" if c in slices)
        self.layout = layout
        sizes = [layout.groups * layout.span(c)[1] for c in self.slices]
        if r > min(in_f, *sizes):
            raise VisionLoRAError(
                f"LoRA rank r={r} exceeds min(in, out) = {min(in_f, *sizes)} of a {in_f}->{min(sizes)} qkv slice."
            )
        n = len(self.slices)
        self.lora_A = nn.Parameter(torch.empty(n, r, in_f, **_factory(base_layer)))
        b_shape = (n, sizes[0], r) if len(set(sizes)) == 1 else (sum(sizes), r)
        self.lora_B = nn.Parameter(torch.zeros(*b_shape, **_factory(base_layer)))
        _init_lora_A(self.lora_A, in_f)
        self._sizes = sizes
        # Output rows of the selected slices, in the row order of the block-diagonal B below.
        rows = torch.cat([layout.rows(c) for c in self.slices])
        self.register_buffer("_rows", rows.to(base_layer.weight.device), persistent=False)
        self._init_magnitude()

    @property
    def dim(self) -> int:
        """Rows of the q slice (for the [q|k|v] thirds layout: each slice's size)."""
        return self.layout.groups * self.layout.q

    @property
    def kind(self) -> str:
        kind = f"qkv[{','.join(self.slices)}]" + ("+dora" if self.use_dora else "")
        return kind if self.layout.is_thirds else f"{kind} {self.layout}"

    @property
    def _covers_all_rows_in_order(self) -> bool:
        return len(self.slices) == 3 and self.layout.is_thirds

    def _dora_rows(self) -> Tensor | None:
        return None if self._covers_all_rows_in_order else self._rows

    def _factors(self) -> tuple[Tensor, Tensor]:
        # B of all selected slices as one (out, S·r) matrix: block-diagonal, zero rows for unselected slices.
        block = torch.block_diag(*self.lora_B.reshape(-1, self.r).split(self._sizes))  # (Σ d_i, S·r)
        if not self._covers_all_rows_in_order:
            block = block.new_zeros(self.layout.out_features, block.shape[1]).index_copy(0, self._rows, block)
        return block, self.lora_A.reshape(-1, self.lora_A.shape[-1])  # (out, S·r), (S·r, in)

    def _forward_folded(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self._modules["base_layer"]._parameters.get("bias"))  # dict reads, see above

    def _forward_train(self, x: Tensor) -> Tensor:
        if isinstance(self.lora_dropout, nn.Identity):
            spans = tuple(self.layout.span(c) for c in self.slices)
            base, groups = self.base_layer, self.layout.groups
            a, b, m = self.lora_A, self.lora_B, self.lora_magnitude
            return sliced_linear(x, base.weight, base.bias, a, b, self.scaling, groups, spans, m)
        return _two_branch_linear(self, x)


class LoRAConv2d(LoRALayer):
    """LoRA around an `nn.Conv2d` (timm's same-padding `Conv2dSame` included): A is a k×k conv to r channels with the
    base conv's stride, padding and dilation, B a 1×1 conv back to the output channels; with DoRA a magnitude (out,)
    normalising each output channel's whole filter. Grouped convs are refused.

    Without dropout and DoRA, training runs one conv with the update folded into the weight and takes the adapter
    gradients from the conv's weight gradient (`folded_conv2d`) where `weight_gradient_is_cheaper` says so; otherwise
    a 1×1 conv with stride 1 on a channels-last input trains as a Linear over the channels (`sliced_linear`, thin
    adapter GEMMs), and anything else as two branches.
    """

    def __init__(
        self,
        base_layer: nn.Conv2d,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if base_layer.groups != 1:
            raise VisionLoRAError(
                f"LoRA cannot adapt a grouped/depthwise conv (groups={base_layer.groups}); leave it out of the targets."
            )
        out_c, in_c, kh, kw = base_layer.weight.shape
        if r > min(in_c * kh * kw, out_c):
            raise VisionLoRAError(
                f"LoRA rank r={r} exceeds min(in·k·k, out) = {min(in_c * kh * kw, out_c)} of a "
                f"{in_c}->{out_c} {kh}x{kw} Conv2d."
            )
        self.lora_A = nn.Parameter(torch.empty(r, in_c, kh, kw, **_factory(base_layer)))
        self.lora_B = nn.Parameter(torch.zeros(out_c, r, 1, 1, **_factory(base_layer)))
        _init_lora_A(self.lora_A, in_c * kh * kw)
        self._init_magnitude()
        self._pointwise = (kh, kw) == (1, 1) and tuple(base_layer.stride) == (1, 1) and _no_padding(base_layer)
        numeric = base_layer.padding_mode == "zeros" and not isinstance(base_layer.padding, str)
        same = isinstance(base_layer, Conv2dSame)
        self._fold_conv = (same or numeric) and weight_gradient_is_cheaper(in_c * kh * kw, out_c, r)

    @property
    def kind(self) -> str:
        kh, kw = self.base_layer.kernel_size
        return f"conv{kh}x{kw}" + ("+dora" if self.use_dora else "")

    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B.reshape(self.lora_B.shape[0], self.r), self.lora_A.reshape(self.r, -1)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Convolve with the base layer's geometry (stride, padding or same-padding, dilation) and another weight."""
        base = self._modules["base_layer"]  # a dict read, as in `_folded_weight`
        if isinstance(base, Conv2dSame):
            return conv2d_same(x, weight, bias, base.stride, base.padding, base.dilation, 1)
        return base._conv_forward(x, weight, bias)

    def _forward_folded(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv(x, weight, self._modules["base_layer"]._parameters.get("bias"))

    def _forward_train(self, x: Tensor) -> Tensor:
        no_dropout = isinstance(self.lora_dropout, nn.Identity)
        base = self.base_layer
        if no_dropout and self._fold_conv and not self.use_dora:
            if isinstance(base, Conv2dSame):  # the same-padding first, then a conv with no padding
                x = pad_same(x, base.kernel_size, base.stride, base.dilation)
            geometry = (tuple(base.stride), tuple(base.padding), tuple(base.dilation))
            return folded_conv2d(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, *geometry)
        if no_dropout and self._pointwise and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            w = base.weight.view(base.out_channels, base.in_channels)  # (out, in)
            a, b = self.lora_A.view(1, self.r, -1), self.lora_B.view(1, -1, self.r)
            y = sliced_linear(
                x.permute(0, 2, 3, 1), w, base.bias, a, b, self.scaling, 1, ((0, w.shape[0]),), self.lora_magnitude
            )  # (N, H, W, out)
            return y.permute(0, 3, 1, 2)  # (N, out, H, W), channels-last in memory
        xd = self.lora_dropout(x)
        lora = F.conv2d(self._conv(xd, self.lora_A, None), self.lora_B * self.scaling)  # s·B A x̃: (N, out, H', W')
        if not self.use_dora:  # scaling folded into the small B weight instead of the activation
            return self.base_layer(x) + lora
        c = self._dora_scale().to(lora.dtype).view(1, -1, 1, 1)  # (1, out, 1, 1)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if not no_dropout:  # as in PEFT: base(x) + (c - 1) ⊙ W x̃ + c ⊙ s·B A x̃
            return self.base_layer(x) + (c - 1) * self._conv(xd, weight, None) + c * lora
        y = (self._conv(x, weight, None) + lora) * c  # c ⊙ (W x + s·B A x)
        return y if bias is None else y + bias.view(1, -1, 1, 1)


def _no_padding(conv: nn.Conv2d) -> bool:
    if isinstance(conv, Conv2dSame) or isinstance(conv.padding, str):
        return conv.kernel_size == (1, 1) and tuple(conv.dilation) == (1, 1)
    return tuple(conv.padding) == (0, 0)
