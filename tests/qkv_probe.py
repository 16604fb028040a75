"""Capture what an attention module feeds its attention product, to prove where a qkv slice update lands."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_PRODUCTS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.bmm,
    torch.baddbmm,
    torch.einsum,
    F.scaled_dot_product_attention,
}
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax}


class _Recorder(TorchFunctionMode):
    """Records, while `on`, the tensor operands of every matmul-like call (q·kᵀ, attn·v, sdpa(q, k, v)) in call order,
    and which of them are derived ones: a softmax output or an earlier product (or a view of one), as opposed to
    tensors taken from the projection (q, k, v themselves, scaled, normalised or reshaped)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.operands: list[list[Tensor]] = []
        self.derived: set[tuple[int, int]] = set()
        self._outputs: list[Tensor] = []  # kept alive so that identity checks stay valid

    def _is_derived(self, t: Tensor) -> bool:
        base = t._base if t._base is not None else t
        for out in self._outputs:
            if t is out or base is out or base is out._base and out._base is not None:
                return True
            if t.shape == out.shape and torch.equal(t, out):
                return True
            if t.dim() >= 2 and t.shape == out.transpose(-2, -1).shape and torch.equal(t, out.transpose(-2, -1)):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            if func in _PRODUCTS:
                flat = [a for a in args if isinstance(a, Tensor)]
                if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
                    flat += [a for a in args[1] if isinstance(a, Tensor)]
                i = len(self.operands)
                self.derived |= {(i, j) for j, t in enumerate(flat) if self._is_derived(t)}
                self.operands.append([t.detach().clone() for t in flat])
            if (func in _PRODUCTS or func in _SOFTMAX) and isinstance(out, Tensor):
                self._outputs.append(out)
        return out


class _Stop(Exception):
    pass


def attention_inputs(model: nn.Module, attn: nn.Module, x: Tensor) -> tuple[list[list[Tensor]], set[tuple[int, int]]]:
    """Run `model(x)` up to the end of `attn`'s first forward and return the operands of the matmul-like calls made
    inside it, and the (call, operand) positions of derived operands (attention weights, earlier products)."""
    rec = _Recorder()

    def pre(*_):
        rec.on = True

    def post(*_):
        rec.on = False
        raise _Stop

    handles = [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)]
    try:
        with rec, torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return rec.operands, rec.derived


def changed(a: list[list[Tensor]], b: list[list[Tensor]]) -> set[tuple[int, int]]:
    """(call, operand) positions whose tensors differ between two recordings of the same forward."""
    assert [len(c) for c in a] == [len(c) for c in b], "the attention took another code path"
    return {
        (i, j)
        for i, (ca, cb) in enumerate(zip(a, b, strict=True))
        for j, (ta, tb) in enumerate(zip(ca, cb, strict=True))
        if not torch.equal(ta, tb)
    }
