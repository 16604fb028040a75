"""Many classifiers on one backbone: one frozen timm model in memory, a LoRA adapter and a head per task, and mixed
batches in which every row names its adapter.

The layers an adapter adapts are wrapped from outside (`_RoutedLayer`; `vision_lora.lora.layers` is not changed):
the frozen layer runs once on the whole batch, then each adapter's low-rank update s·B(A x) runs only on its own
rows and is added to them (DoRA: the rows are rescaled by the adapter's c = m / ‖W + s·B·A‖, computed once when it is
loaded). Nothing is folded into a weight, so an adapter costs its A and B, not a copy of the layer. The head is
routed the same way: each adapter's own head on its rows. A batch is grouped by adapter first, so that every adapter's
rows are one slice and no gather or scatter is needed.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import Tensor, nn

from ..errors import VisionLoRAError
from ..lora.adapter import load_adapter, read_adapter_config
from ..lora.inject import lora_layers
from ..lora.layers import LoRALayer, LoRAQKVLinear
from ..lora.targets import classifier_names
from ..preprocess import complete_data_config, resolve_data_config
from ..weights import create_backbone
from .adapters import AdapterSpec, BackboneSpec, check_compatible, check_name, inspect_adapter

__all__ = ["MultiAdapterModel", "resolve_backbone"]


class _Route:
    """The row slices of the batch now running: one (adapter, start, stop) per adapter, rows grouped by adapter."""

    def __init__(self) -> None:
        self.batch = 0
        self.segments: list[tuple[str, int, int]] = []
        self.missed: set[str] = set()  # routed modules with an active adapter that the forward did not call
        self._index: dict[int, Tensor] = {}

    def start(self, batch: int, segments: list[tuple[str, int, int]]) -> None:
        self.batch, self.segments, self._index = batch, segments, {}

    def index(self, per_row: int) -> Tensor:
        """(batch · per_row,) the position in `segments` of each row's adapter."""
        if per_row not in self._index:
            counts = torch.tensor([(e - s) * per_row for _, s, e in self.segments])
            self._index[per_row] = torch.repeat_interleave(torch.arange(len(self.segments)), counts)
        return self._index[per_row]


@dataclass
class _Update:
    """One adapter's low-rank update of one layer: s·B(A x), B already multiplied by s.

    `a` is (k, in) or (k, in, kh, kw); `b` is (out, k) / (out, k, 1, 1), or for a per-slice qkv LoRA a list of
    (rows, B_j (d_j, r)) with `rows` a slice or an index of output features; `c` is DoRA's (out,) row scale.
    """

    a: Tensor
    b: Tensor | list[tuple[slice | Tensor, Tensor]]
    c: Tensor | None
    pointwise: bool = False  # a 1x1 conv with stride 1 and no padding: A (k, in) and B (out, k) as matmuls


def _rows_index(rows: Tensor) -> slice | Tensor:
    start, n = int(rows[0]), len(rows)
    return slice(start, start + n) if torch.equal(rows, torch.arange(start, start + n)) else rows


def _update_of(layer: LoRALayer) -> _Update:
    """The update of a loaded LoRA layer, without a reference to the layer (which holds the shared base weight)."""
    with torch.no_grad():
        c = layer._dora_scale().to(layer.base_layer.weight.dtype) if layer.use_dora else None
        if isinstance(layer, LoRAQKVLinear):
            r = layer.r
            b_all = layer.lora_B.detach().reshape(-1, r).split(layer._sizes)  # per slice (d_j, r)
            slices = zip(layer.slices, b_all, strict=True)
            b = [(_rows_index(layer.layout.rows(s)), bj * layer.scaling) for s, bj in slices]
            return _Update(layer.lora_A.detach().reshape(-1, layer.lora_A.shape[-1]).clone(), b, c)
        a, b = layer.lora_A.detach().clone(), layer.lora_B.detach() * layer.scaling
        if getattr(layer, "_pointwise", False):  # tiny convs per adapter cost more to set up than to run
            return _Update(a.flatten(1), b.flatten(1), c, pointwise=True)
        return _Update(a, b, c)


class _RoutedLayer(nn.Module):
    """A frozen Linear / Conv2d that adds each adapter's update to that adapter's rows of its output."""

    def __init__(self, base_layer: nn.Module, name: str, route: _Route) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.updates: dict[str, _Update] = {}
        self._name, self._route = name, route
        self._cache: tuple[list, tuple] | None = None

    @property
    def weight(self) -> Tensor:
        # A module that reads `.weight` and bypasses the call would skip the updates: `forward` reports it.
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _delta(self, x: Tensor, u: _Update) -> Tensor:
        if u.pointwise:
            n, _, height, width = x.shape
            return (u.b @ (u.a @ x.flatten(2))).view(n, -1, height, width)  # (k, in) @ (n, in, HW) -> (n, out, H, W)
        if u.a.dim() == 4:  # conv: A with the base conv's geometry, then B as a 1x1 conv
            base = self.base_layer
            if isinstance(base, Conv2dSame):
                h = conv2d_same(x, u.a, None, base.stride, base.padding, base.dilation, 1)
            else:
                h = base._conv_forward(x, u.a, None)  # (n, k, H', W')
            return F.conv2d(h, u.b)  # (n, out, H', W')
        return F.linear(F.linear(x, u.a), u.b)  # (..., k) -> (..., out)

    def forward(self, x: Tensor) -> Tensor:
        route = self._route
        out = self.base_layer(x)  # the frozen path, once for the whole batch
        per_row = x.shape[0] // route.batch  # > 1 where rows were split into windows (Swin) or tokens
        active = [(s * per_row, e * per_row, self.updates.get(a)) for a, s, e in route.segments]
        present = [(s, e, u) for s, e, u in active if u is not None]
        if not present:
            return out
        route.missed.discard(self._name)
        if len(present) > 1 and all(u.a.dim() == 2 for _, _, u in present) and out.is_contiguous():
            self._stacked(x, out, [u for _, _, u in active], per_row)
            return out
        for start, stop, u in present:
            self._segment(x[start:stop], out[start:stop], u)
        return out

    def _segment(self, xs: Tensor, ys: Tensor, u: _Update) -> None:
        """One adapter's update added to its rows `ys` (a view of the output) in place."""
        conv = ys.dim() == 4
        bias = self.base_layer.bias
        if bias is not None and conv:
            bias = bias.view(-1, 1, 1)
        if u.c is not None and bias is not None:  # DoRA rescales W x + s·B A x, not the bias
            ys.sub_(bias)
        if isinstance(u.b, list):  # per-slice qkv LoRA: each slice's B on its own output rows
            h = F.linear(xs, u.a)  # (..., S·r)
            r = u.b[0][1].shape[1]
            for j, (rows, bj) in enumerate(u.b):
                delta = F.linear(h[..., j * r : (j + 1) * r], bj)  # (..., d_j)
                if isinstance(rows, slice):
                    ys[..., rows] += delta
                else:
                    ys.index_add_(ys.dim() - 1, rows, delta)
        else:
            ys += self._delta(xs, u)
        if u.c is not None:
            ys.mul_(u.c.view(-1, 1, 1) if conv else u.c)
            if bias is not None:
                ys.add_(bias)

    def _stack(self, updates: list[_Update | None]) -> tuple[Tensor, Tensor, Tensor | None]:
        """A (G, k, in), B (G, out, k) and DoRA's c (G, out) of the batch's adapters, ranks zero-padded to the largest
        (an adapter without this layer: zeros, c = 1); kept for the next batch of the same adapters."""
        cached = self._cache
        same = cached is not None and len(cached[0]) == len(updates)
        if same and all(a is b for a, b in zip(cached[0], updates, strict=True)):
            return cached[1]
        w = self.base_layer.weight
        out_f, in_f = w.shape[0], w[0].numel()
        k = max(u.a.shape[0] for u in updates if u is not None)
        plain = all(u is not None and u.c is None and not isinstance(u.b, list) for u in updates)
        if plain and all(u.a.shape[0] == k for u in updates):  # the common case: one copy each, no padding
            stacked = (torch.stack([u.a for u in updates]), torch.stack([u.b for u in updates]), None)
            self._cache = (list(updates), stacked)
            return stacked
        a_all = w.new_zeros(len(updates), k, in_f)
        b_all = w.new_zeros(len(updates), out_f, k)
        dora = any(u is not None and u.c is not None for u in updates)
        c_all = w.new_ones(len(updates), out_f) if dora else None
        for g, u in enumerate(updates):
            if u is None:
                continue
            a_all[g, : u.a.shape[0]] = u.a
            if isinstance(u.b, list):  # per-slice qkv: B_j into its rows and its r columns of the stacked B
                r = u.b[0][1].shape[1]
                for j, (rows, bj) in enumerate(u.b):
                    b_all[g, rows, j * r : (j + 1) * r] = bj
            else:
                b_all[g, :, : u.b.shape[1]] = u.b
            if u.c is not None:
                c_all[g] = u.c
        self._cache = (list(updates), (a_all, b_all, c_all))
        return a_all, b_all, c_all

    def _stacked(self, x: Tensor, out: Tensor, updates: list[_Update | None], per_row: int) -> None:
        """Every adapter's update in a few batched matmuls: each row multiplied by its own adapter's A and B."""
        a_all, b_all, c_all = self._stack(updates)
        index = self._route.index(per_row)  # (R,) the adapter of each row
        a_rows, b_rows = a_all[index], b_all[index]  # (R, k, in), (R, out, k)
        rows, bias = x.shape[0], self.base_layer.bias
        if out.dim() == 4:  # pointwise conv: channels are the features
            delta = b_rows @ (a_rows @ x.flatten(2))  # (R, k, in) @ (R, in, HW) -> (R, out, HW)
            y = out.view(rows, out.shape[1], -1)  # (R, out, HW)
            c = c_all[index][:, :, None] if c_all is not None else None  # (R, out, 1)
            bias = bias[:, None] if bias is not None else None
        else:
            h = x.reshape(rows, -1, x.shape[-1]) @ a_rows.transpose(1, 2)  # (R, T, in) @ (R, in, k) -> (R, T, k)
            delta = h @ b_rows.transpose(1, 2)  # (R, T, out)
            y = out.view(rows, -1, out.shape[-1])  # (R, T, out)
            c = c_all[index][:, None, :] if c_all is not None else None  # (R, 1, out)
        if c is None:
            y += delta
            return
        if bias is not None:
            y -= bias
        y += delta
        y *= c
        if bias is not None:
            y += bias


class _RoutedHead(nn.Module):
    """Each adapter's own head on its rows; outputs padded with zeros to the widest head of the batch."""

    def __init__(self, route: _Route) -> None:
        super().__init__()
        self.heads: dict[str, nn.Module] = {}
        self._route = route

    def forward(self, x: Tensor) -> Tensor:
        route = self._route
        per_row = x.shape[0] // route.batch
        outs = [self.heads[a](x[s * per_row : e * per_row]) for a, s, e in route.segments]  # (n_a, ..., C_a)
        width = max(o.shape[-1] for o in outs)
        return torch.cat([F.pad(o, (0, width - o.shape[-1])) for o in outs])  # (N, ..., C_max)


def resolve_backbone(
    backbone: str, weights: str, input_size: int | None = None, data_config: dict | None = None
) -> tuple[nn.Module, BackboneSpec]:
    """The frozen backbone in eval mode and what adapters must match: its name, weight source and preprocessing
    (`data_config`, else its timm data config with `input_size`).

    Raises:
        VisionLoRAError: an unknown model or a weight source that cannot be loaded (see `create_backbone`).
        FileNotFoundError: a weights file that does not exist.
    """
    model = create_backbone(backbone, weights=weights).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = data_config or resolve_data_config(model, {"input_size": input_size} if input_size else None)
    return model, BackboneSpec(backbone, weights, complete_data_config(config))


class MultiAdapterModel(nn.Module):
    """One frozen timm backbone and any number of LoRA adapters (each with its own head, classes and rank), run
    together in mixed batches.

    Args:
        backbone: the timm model name, e.g. "vit_small_patch16_224".
        weights: its weight source (see `create_backbone`); each adapter must record the same.
        data_config: the preprocessing served; None: the backbone's timm data config with `input_size`, or when
            neither is given, the preprocessing the first adapter added records (`data_config` then follows it).
        input_size: the input side when `data_config` is None (None: timm's).

    Example:
        >>> multi = MultiAdapterModel("vit_small_patch16_224", weights="hub")
        >>> multi.add_adapter("digits", "runs/digits/adapter")
        >>> logits = multi(x, ["digits", "digits"])  # one (C,) tensor per row
    """

    def __init__(
        self,
        backbone: str,
        weights: str = "random",
        data_config: dict | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        model, self.spec = resolve_backbone(backbone, weights, input_size, data_config)
        self.name, self.data_config = backbone, self.spec.data_config
        self._follow_first = data_config is None and input_size is None
        self._plain = [model]  # the unrouted model, kept out of the module tree: adapters are loaded onto copies of it
        self._shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self._heads = classifier_names(model)
        if len(self._heads) != 1:
            raise VisionLoRAError(f"{backbone} has {len(self._heads)} classifier heads; multi-adapter serving needs 1.")
        self._route = _Route()
        # The served model: the same modules and tensors, with its layers wrapped as adapters need them.
        self.model = copy.deepcopy(model, memo=dict(self._shared))
        routed_head = _RoutedHead(self._route)
        for head in self._heads:
            self._replace(head, routed_head)
        self.adapters: dict[str, AdapterSpec] = {}
        self._routed: dict[str, _RoutedLayer] = {}

    def _replace(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, module)

    @property
    def _head(self) -> _RoutedHead:
        return self.model.get_submodule(self._heads[0])

    def add_adapter(self, name: str, directory: str | os.PathLike, max_bytes: int = 64_000_000) -> AdapterSpec:
        """Load the adapter in `directory` (a vision_lora adapter or a PEFT LoRA / DoRA export) as `name`, replacing
        an adapter of that name only once the new one has loaded.

        Raises:
            VisionLoRAError: a bad name, or an adapter that cannot serve beside the others: another backbone, weight
                source or preprocessing, one that trains biases or norm layers, a pickle, a file over `max_bytes`, or
                tensors that do not fit the backbone. The model is unchanged then.
        """
        check_name(name)
        spec = inspect_adapter(directory, max_bytes)
        if self._follow_first and not self.adapters and spec.data_config is not None:
            self.spec = BackboneSpec(self.spec.name, self.spec.weights, spec.data_config)
            self.data_config = spec.data_config
        check_compatible(spec, self.spec)
        plain = self._plain[0]
        # A copy of the structure whose frozen tensors are the backbone's own; only its head is new.
        memo = {k: v for k, v in self._shared.items() if not self._in_head(plain, v)}
        clone = copy.deepcopy(plain, memo=memo)
        clone.reset_classifier(spec.num_classes)
        info = read_adapter_config(spec.path) if spec.format == "vision_lora" else None
        if info is not None and any(h in info["adapted_modules"] for h in self._heads):
            raise VisionLoRAError("it puts LoRA on the classifier head; serve it alone with `serve --adapter`.")
        try:
            load_adapter(clone, spec.path, info)
            updates = {n: _update_of(layer) for n, layer in lora_layers(clone).items()}
        finally:  # loading sets requires_grad on the shared tensors (and a failed load unfreezes them)
            for t in self._shared.values():
                t.requires_grad_(False)
        head = clone.get_submodule(self._heads[0]).requires_grad_(False)
        del clone
        self.remove_adapter(name, missing_ok=True)
        for module_name, update in updates.items():
            self._routed_layer(module_name).updates[name] = update
        self._head.heads[name] = head
        self.adapters[name] = spec
        return spec

    def _in_head(self, plain: nn.Module, tensor: Tensor) -> bool:
        return any(tensor is t for h in self._heads for t in plain.get_submodule(h).state_dict(keep_vars=True).values())

    def _routed_layer(self, name: str) -> _RoutedLayer:
        if name not in self._routed:
            base = self.model.get_submodule(name)
            if isinstance(base, (LoRALayer, _RoutedLayer)) or not isinstance(base, (nn.Linear, nn.Conv2d)):
                raise VisionLoRAError(f"'{name}' is a {type(base).__name__}; only Linear and Conv2d are routed.")
            self._routed[name] = _RoutedLayer(base, name, self._route)
            self._replace(name, self._routed[name])
        return self._routed[name]

    def remove_adapter(self, name: str, missing_ok: bool = False) -> None:
        """Drop an adapter and its tensors.

        Raises:
            KeyError: no adapter of that name (unless `missing_ok`).
        """
        if name not in self.adapters:
            if missing_ok:
                return
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        for layer in self._routed.values():
            layer.updates.pop(name, None)
            layer._cache = None  # it may hold the adapter's tensors
        self._head.heads.pop(name)
        del self.adapters[name]

    def forward(self, x: Tensor, adapter_names: list[str]) -> list[Tensor]:
        """Logits of every row of `x` (N, 3, H, W) under the adapter named for it, each over that adapter's classes.

        Returns:
            N tensors, row i of shape (num_classes of adapter_names[i],).

        Raises:
            KeyError: an adapter that is not loaded.
            VisionLoRAError: the number of names is not N, or the backbone bypassed an adapted module (a timm block that
                reads `.weight` directly, as BEiT and EVA attention do).
        """
        n = x.shape[0]
        if len(adapter_names) != n:
            raise VisionLoRAError(f"{len(adapter_names)} adapter names for a batch of {n} rows; give one per row.")
        unknown = sorted(set(adapter_names) - set(self.adapters))
        if unknown:
            raise KeyError(f"adapters not loaded: {unknown}; loaded: {sorted(self.adapters)}")
        order: dict[str, list[int]] = {}
        # Grouped by name, so that the same adapters come in the same order (`_RoutedLayer._stack` reuses its stack).
        for i in sorted(range(n), key=adapter_names.__getitem__):
            order.setdefault(adapter_names[i], []).append(i)
        perm = [i for rows in order.values() for i in rows]
        grouped = x if perm == list(range(n)) else x[perm]
        route, start, segments = self._route, 0, []
        for a, rows in order.items():
            segments.append((a, start, start + len(rows)))
            start += len(rows)
        route.start(n, segments)
        route.missed = {m for m, layer in self._routed.items() if set(layer.updates) & set(order)}
        logits = self.model(grouped)  # (N, C_max), rows grouped by adapter
        if route.missed:
            raise VisionLoRAError(
                f"{self.name} bypassed the adapted modules {sorted(route.missed)[:3]} (it reads their weights "
                f"directly); mixed batches cannot serve this backbone."
            )
        out: list[Tensor] = [logits] * n
        for pos, i in enumerate(perm):
            out[i] = logits[pos, : self.adapters[adapter_names[i]].num_classes]
        return out
