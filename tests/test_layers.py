from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from vision_lora import LoRAConv2d, LoRALinear, LoRAQKVLinear
from vision_lora.lora import QKVLayout


def _randomize(layer):
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    return layer


def test_fresh_linear_computes_the_base_output():
    base = nn.Linear(16, 24)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.scaling == 2.0


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(16, 24), r=4, lora_alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(4.0)


def test_linear_matches_explicit_formula_in_train_and_eval():
    base = nn.Linear(16, 24)
    layer = _randomize(LoRALinear(base, r=4, lora_alpha=8))
    x = torch.randn(3, 5, 16)
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    layer.train()
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():  # cached fold
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x), expected)


def test_eval_fold_cache_follows_parameter_updates():
    layer = _randomize(LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=2)).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B.add_(1.0)
        after = layer(x)
    expected = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)


def test_eval_mode_still_trains_the_adapter():
    layer = _randomize(LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=2)).eval()
    layer(torch.randn(4, 8)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("slices", ["q", "v", "qv", "qkv", "k"])
def test_qkv_updates_only_selected_slices(slices):
    dim = 12
    base = nn.Linear(dim, 3 * dim)
    layer = _randomize(LoRAQKVLinear(base, r=2, lora_alpha=4, slices=slices))
    delta = layer.delta_weight()
    for i, name in enumerate("qkv"):
        rows = delta[i * dim : (i + 1) * dim]
        if name in slices:
            assert rows.abs().sum() > 0
        else:
            assert torch.equal(rows, torch.zeros_like(rows))
    x = torch.randn(2, 7, dim)
    layer.train()
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)


@pytest.mark.parametrize("slices", ["q", "k", "v", "qv", "kv", "qkv"])
def test_per_head_layout_updates_exactly_the_rows_of_the_selected_slices(slices):
    """tiny_vit-like per-head [q|k|v] groups with v wider than q and k: the update lands on exactly the rows the
    layout names, and each slice's block is its own B_i A_i."""
    layout = QKVLayout(groups=4, q=3, k=3, v=5)
    width = 3 + 3 + 5
    layer = _randomize(LoRAQKVLinear(nn.Linear(16, 4 * width), r=2, lora_alpha=4, slices=slices, layout=layout))
    delta = layer.delta_weight()
    for part, (off, size) in (("q", (0, 3)), ("k", (3, 3)), ("v", (6, 5))):
        rows = torch.cat([torch.arange(g * width + off, g * width + off + size) for g in range(4)])
        if part in slices:
            assert (delta[rows].abs().sum(1) > 0).all(), part
        else:
            assert torch.equal(delta[rows], torch.zeros_like(delta[rows])), part
    x = torch.randn(2, 7, 16)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
    assert layer.kind.endswith("4x[q3|k3|v5]")


def test_qkv_layout_that_does_not_cover_the_linear_is_refused():
    with pytest.raises(ValueError, match="covers 40 rows"):
        LoRAQKVLinear(nn.Linear(8, 44), 2, 2, layout=QKVLayout(4, 3, 3, 4))


def test_standard_qkv_keeps_its_state_dict_shapes():
    """Adapters saved before layouts existed hold lora_A (S, r, in) and lora_B (S, dim, r): the thirds layout keeps
    exactly these keys and shapes."""
    layer = LoRAQKVLinear(nn.Linear(12, 36), r=2, lora_alpha=2, slices="qv")
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if "lora_" in k}
    assert shapes == {"lora_A": (2, 2, 12), "lora_B": (2, 12, 2)}


def test_qkv_slices_have_their_own_factors():
    layer = _randomize(LoRAQKVLinear(nn.Linear(12, 36), r=2, lora_alpha=2, slices="qv"))
    delta = layer.delta_weight()
    torch.testing.assert_close(delta[:12], layer.lora_B[0] @ layer.lora_A[0])
    torch.testing.assert_close(delta[24:], layer.lora_B[1] @ layer.lora_A[1])
    assert torch.linalg.matrix_rank(delta[:12]) <= 2


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 1),
        nn.Conv2d(8, 16, 1, stride=2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2),
        Conv2dSame(8, 16, 3, stride=2),
        Conv2dSame(8, 16, 5, stride=1),
    ],
    ids=["1x1", "1x1-s2", "3x3", "3x3-s2-d2", "same-3x3-s2", "same-5x5"],
)
def test_conv_update_equals_convolution_with_delta_weight(conv):
    layer = _randomize(LoRAConv2d(conv, r=4, lora_alpha=4))
    x = torch.randn(2, 8, 15, 15)
    reference = nn.Conv2d(8, 16, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if isinstance(conv, Conv2dSame):
        reference = Conv2dSame(8, 16, conv.kernel_size, conv.stride)
    with torch.no_grad():
        reference.weight.copy_(conv.weight + layer.delta_weight())
        reference.bias.copy_(conv.bias)
    layer.train()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    delta2d = layer.delta_weight().flatten(1)
    assert torch.linalg.matrix_rank(delta2d) <= 4


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="grouped/depthwise"):
        LoRAConv2d(nn.Conv2d(8, 8, 3, groups=8), r=2, lora_alpha=2)


@pytest.mark.parametrize("r", [0, 9])
def test_rank_out_of_range_is_refused(r):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(8, 16), r=r, lora_alpha=1)


def test_nonpositive_alpha_is_refused():
    with pytest.raises(ValueError, match="lora_alpha"):
        LoRALinear(nn.Linear(8, 16), r=2, lora_alpha=0)


@pytest.mark.parametrize(
    "layer_fn",
    [
        lambda: LoRALinear(nn.Linear(16, 24), 4, 8),
        lambda: LoRAQKVLinear(nn.Linear(16, 48), 4, 8),
        lambda: LoRAConv2d(Conv2dSame(8, 16, 3, stride=2), 4, 8),
    ],
    ids=["linear", "qkv", "conv"],
)
def test_merge_matches_unmerged_and_unmerge_restores_exactly(layer_fn):
    layer = _randomize(layer_fn()).eval()
    x = torch.randn(2, 8, 9, 9) if isinstance(layer, LoRAConv2d) else torch.randn(2, 5, layer.base_layer.in_features)
    original = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # runs once
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_layer(x), unmerged, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), unmerged)


def test_merge_unmerge_thousand_times_does_not_drift():
    layer = _randomize(LoRALinear(nn.Linear(32, 32), 4, 8))
    original = layer.base_layer.weight.detach().clone()
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_merge_is_independent_of_train_eval():
    layer = _randomize(LoRALinear(nn.Linear(8, 8), 2, 2))
    layer.eval()
    layer.train()
    assert not layer.merged


def test_bf16_merge_is_finite_and_close():
    layer = _randomize(LoRALinear(nn.Linear(64, 64), 8, 16)).to(torch.bfloat16)
    expected = layer.base_layer.weight.float() + layer.delta_weight().float()
    layer.merge()
    w = layer.base_layer.weight
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    torch.testing.assert_close(w.float(), expected, rtol=1.6e-2, atol=1e-2)


def test_fp16_merge_that_overflows_is_refused_and_leaves_weight_unchanged():
    layer = LoRALinear(nn.Linear(8, 8), 2, 2).half()
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0)
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="overflows"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_wrapper_exposes_base_attributes():
    layer = LoRALinear(nn.Linear(8, 12), 2, 2)
    assert layer.in_features == 8 and layer.out_features == 12
    assert layer.bias is layer.base_layer.bias
    assert all("lora_" in n for n, p in layer.named_parameters() if not n.startswith("base_layer."))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoRALinear(nn.Linear(12, 20), 4, 8),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 3, 6, slices="qv"),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 3, 6, slices="k"),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 3, 6, slices="qkv"),
        lambda: LoRAQKVLinear(nn.Linear(12, 44), 2, 6, slices="qv", layout=QKVLayout(4, 3, 3, 5)),
        lambda: LoRAQKVLinear(nn.Linear(12, 44), 2, 6, slices="qkv", layout=QKVLayout(4, 3, 3, 5)),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 2, 6, slices="v", layout=QKVLayout(3, 4, 4, 4)),
    ],
    ids=["linear", "qkv-qv", "qkv-k", "qkv-all", "per-head-qv", "per-head-all", "per-head-v"],
)
def test_fused_training_path_has_the_gradients_of_the_plain_formula(make):
    """The training forward folds the update into one GEMM with a hand-written backward; its output and gradients
    (input, A, B, and bias / weight when they train) must be those of y = base(x) + s·x Aᵀ Bᵀ."""
    layer = _randomize(make()).train()
    layer.base_layer.bias.requires_grad_(True)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    layer(x).pow(2).sum().backward()
    fast = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.base_layer.bias, layer.base_layer.weight)]

    for t in (x, layer.lora_A, layer.lora_B, layer.base_layer.bias, layer.base_layer.weight):
        t.grad = None
    plain = layer.base_layer(x) + x @ layer.delta_weight().T  # autograd through the explicit formula
    plain.pow(2).sum().backward()
    ref = [t.grad for t in (x, layer.lora_A, layer.lora_B, layer.base_layer.bias, layer.base_layer.weight)]
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_path_under_bf16_autocast():
    layer = _randomize(LoRAQKVLinear(nn.Linear(16, 48), 4, 8)).train()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    expected = layer.base_layer(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(layer.lora_B.grad).all() and layer.lora_B.grad.abs().sum() > 0


def test_dropout_path_trains_and_matches_in_eval():
    layer = _randomize(LoRALinear(nn.Linear(8, 8), 2, 2, lora_dropout=0.5))
    x = torch.randn(64, 8)
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T)


def test_conv_layer_in_channels_last_format():
    layer = _randomize(LoRAConv2d(nn.Conv2d(8, 16, 3, padding=1), 4, 8)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    expected = layer.base_layer(x) + nn.functional.conv2d(x, layer.delta_weight(), padding=1)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


# -- DoRA -------------------------------------------------------------------------------------------------------------


def _dora_randomize(layer):
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        layer.lora_magnitude.mul_(1.0 + 0.2 * torch.randn_like(layer.lora_magnitude))
    return layer


def _peft_twin(ours, **kwargs):
    """PEFT's own DoRA layer around a copy of our base layer, with our A, B and magnitude."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import layer as peft_layer

    base = copy.deepcopy(ours.base_layer)
    config = LoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, use_dora=True, **kwargs)
    cls = peft_layer.Conv2d if isinstance(base, nn.Conv2d) else peft_layer.Linear
    twin = cls(base, "default", config=config, r=ours.r, lora_alpha=ours.lora_alpha, use_dora=True, **kwargs)
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(ours.lora_A.view_as(twin.lora_A["default"].weight))
        twin.lora_B["default"].weight.copy_(ours.lora_B.view_as(twin.lora_B["default"].weight))
        m = twin.lora_magnitude_vector["default"].weight
        m.copy_(ours.lora_magnitude.view_as(m))
    return twin


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: LoRALinear(nn.Linear(12, 20), 4, 8, use_dora=True), (2, 5, 12)),
        (lambda: LoRALinear(nn.Linear(12, 20), 4, 8, use_rslora=True, use_dora=True), (2, 5, 12)),
        (lambda: LoRAConv2d(nn.Conv2d(8, 16, 1), 4, 8, use_dora=True), (2, 8, 5, 5)),
        (lambda: LoRAConv2d(nn.Conv2d(8, 16, 3, stride=2, padding=1), 4, 8, use_dora=True), (2, 8, 9, 9)),
    ],
    ids=["linear", "linear-rslora", "conv1x1", "conv3x3"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dora_equals_peft_dora_in_outputs_and_gradients(make, shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels-last is a conv layout")
    ours = _dora_randomize(make())
    twin = _peft_twin(ours, use_rslora=ours.use_rslora)
    x = torch.randn(*shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    for mode in (True, False):
        ours.train(mode)
        twin.train(mode)
        torch.testing.assert_close(ours(x), twin(x), rtol=1e-5, atol=1e-5)
    ours.train()
    twin.train()
    ours(x).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    pairs = [
        (ours.lora_A, twin.lora_A["default"].weight),
        (ours.lora_B, twin.lora_B["default"].weight),
        (ours.lora_magnitude, twin.lora_magnitude_vector["default"].weight),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.grad.view_as(want.grad), want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoRALinear(nn.Linear(12, 20), 4, 8, use_dora=True),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 3, 6, slices="qv", use_dora=True),
        lambda: LoRAQKVLinear(nn.Linear(12, 44), 2, 6, slices="qv", layout=QKVLayout(4, 3, 3, 5), use_dora=True),
        lambda: LoRAConv2d(nn.Conv2d(8, 16, 3, padding=1), 4, 8, use_dora=True),
        lambda: LoRAConv2d(Conv2dSame(8, 16, 3, stride=2), 4, 8, use_dora=True),
    ],
    ids=["linear", "qkv", "per-head-qkv", "conv3x3", "conv-same"],
)
def test_fresh_dora_layer_is_the_base_layer_and_merges_exactly(make):
    layer = make()
    conv = isinstance(layer, LoRAConv2d)
    x = torch.randn(2, 8, 9, 9) if conv else torch.randn(2, 5, 12)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), layer.base_layer(x), rtol=1e-6, atol=1e-6)
    _dora_randomize(layer).eval()
    original = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), unmerged)


@pytest.mark.parametrize("layout", [None, QKVLayout(4, 3, 3, 5)], ids=["thirds", "per-head"])
def test_qkv_dora_rescales_only_the_adapted_rows(layout):
    out = 44 if layout else 36
    layer = _dora_randomize(LoRAQKVLinear(nn.Linear(12, out), 2, 4, slices="v", layout=layout, use_dora=True))
    w = layer.base_layer.weight
    rows = layer.layout.rows("v")
    v = w + layer.delta_weight()
    expected = w.detach().clone()
    expected[rows] = layer.lora_magnitude[:, None] * v[rows] / v[rows].norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.weight, expected)
    others = torch.ones(out, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(layer.weight[others], w[others])
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer.train()(x), nn.functional.linear(x, expected, layer.base_layer.bias))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoRALinear(nn.Linear(12, 20), 4, 8, use_dora=True),
        lambda: LoRAQKVLinear(nn.Linear(12, 36), 3, 6, slices="qv", use_dora=True),
        lambda: LoRAQKVLinear(nn.Linear(12, 44), 2, 6, slices="qkv", layout=QKVLayout(4, 3, 3, 5), use_dora=True),
        lambda: LoRAConv2d(nn.Conv2d(12, 20, 1), 4, 8, use_dora=True),
        lambda: LoRAConv2d(nn.Conv2d(12, 20, 1), 4, 8),
    ],
    ids=["linear", "qkv", "per-head-qkv", "conv1x1", "conv1x1-lora"],
)
def test_dora_fused_training_path_has_the_gradients_of_the_weight_formula(make):
    """The one-GEMM DoRA backward (and the channels-last 1×1 conv path) against autograd through `.weight`."""
    layer = make()
    if layer.use_dora:
        _dora_randomize(layer)
    else:
        _randomize(layer)
    layer.train()
    conv = isinstance(layer, LoRAConv2d)
    x = torch.randn(2, 12, 4, 5).contiguous(memory_format=torch.channels_last) if conv else torch.randn(2, 5, 12)
    x.requires_grad_(True)
    params = [x, *(p for n, p in layer.named_parameters() if "lora_" in n)]
    layer(x).pow(2).sum().backward()
    fast = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    w, b = layer.weight, layer.base_layer.bias
    plain = nn.functional.conv2d(x, w, b) if conv else nn.functional.linear(x, w, b)
    plain.pow(2).sum().backward()
    for got, param in zip(fast, params, strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-5)


def test_dora_with_dropout_trains_and_matches_in_eval():
    layer = _dora_randomize(LoRAConv2d(nn.Conv2d(4, 8, 3), 2, 4, lora_dropout=0.5, use_dora=True))
    x = torch.randn(2, 4, 7, 7)
    layer.train()(x).sum().backward()
    assert layer.lora_magnitude.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0
    twin = _peft_twin(layer, lora_dropout=0.5)
    torch.testing.assert_close(layer.eval()(x), twin.eval()(x), rtol=1e-5, atol=1e-5)


def test_dora_norm_overflow_in_fp16_is_refused():
    base = nn.Linear(64, 8).half()
    with torch.no_grad():
        base.weight.fill_(10000.0)  # each row norm is 80000, beyond fp16's 65504
    before = base.weight.clone()
    with pytest.raises(ValueError, match="DoRA.*overflows"):
        LoRALinear(base, 2, 4, use_dora=True)
    assert torch.equal(base.weight, before)


def test_dora_training_path_under_bf16_autocast():
    layer = _dora_randomize(LoRAQKVLinear(nn.Linear(16, 48), 4, 8, use_dora=True)).train()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude.grad.dtype == torch.float32 and torch.isfinite(layer.lora_magnitude.grad).all()
    torch.testing.assert_close(y.float(), nn.functional.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=2e-2)


def test_dora_magnitude_is_a_lora_parameter():
    layer = LoRAQKVLinear(nn.Linear(12, 36), 2, 4, slices="qv", use_dora=True)
    assert layer.lora_magnitude.shape == (24,)
    assert all("lora_" in n for n, p in layer.named_parameters() if not n.startswith("base_layer."))
