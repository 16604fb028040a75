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
    """Records, while `on`, the tensor operands of every matmul-like call (q·kᵀ, attn·v, sdpa(q, k, v)) and every
    softmax output, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.operands: list[list[Tensor]] = []
        self.softmax: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            if func in _PRODUCTS:
                flat = [a for a in args if isinstance(a, Tensor)]
                if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
                    flat += [a for a in args[1] if isinstance(a, Tensor)]
                self.operands.append([t.detach().clone() for t in flat])
            elif func in _SOFTMAX:
                self.softmax.append(out.detach().clone())
        return out


class _Stop(Exception):
    pass


def attention_inputs(model: nn.Module, attn: nn.Module, x: Tensor) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Run `model(x)` up to the end of `attn`'s first forward and return the operands of the matmul-like calls and
    the softmax outputs made inside it."""
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
    return rec.operands, rec.softmax


def changed(a: list[list[Tensor]], b: list[list[Tensor]]) -> set[tuple[int, int]]:
    """(call, operand) positions whose tensors differ between two recordings of the same forward."""
    assert [len(c) for c in a] == [len(c) for c in b], "the attention took another code path"
    return {
        (i, j)
        for i, (ca, cb) in enumerate(zip(a, b, strict=True))
        for j, (ta, tb) in enumerate(zip(ca, cb, strict=True))
        if not torch.equal(ta, tb)
    }
