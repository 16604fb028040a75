"""`--model.compile`: the compiled backbone gives the eager logits in train and eval mode (the eval fold cache) and
after a merge, trains in a Lightning fit step, and leaves state dicts and checkpoints as they were.

Inductor compiles for minutes on a small shared CPU, so the default suite compiles with the `aot_eager` backend (the
same Dynamo graph capture and guards, run by eager kernels); `pytest -m slow` repeats the parity with inductor."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from vision_lora import LoRAClassifier, merge_lora


@pytest.fixture
def aot_eager(monkeypatch):
    """`torch.compile` with the aot_eager backend wherever LoRAClassifier calls it."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _pair(backbone: str) -> tuple[LoRAClassifier, LoRAClassifier]:
    """An eager and a compiled classifier with the same weights and a non-zero adapter."""
    torch.manual_seed(0)
    eager = LoRAClassifier(backbone, num_classes=4)
    for name, p in eager.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    compiled = LoRAClassifier(backbone, num_classes=4, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _logits_match_in_train_eval_and_merged(eager: LoRAClassifier, compiled: LoRAClassifier, tol: dict) -> None:
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 3])
    for m in (eager, compiled):
        m.train()
    losses, grads = {}, {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        m.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters() if "lora_" in n}
    torch.testing.assert_close(losses["compiled"], losses["eager"], **tol)
    assert grads["eager"] and grads["eager"].keys() == grads["compiled"].keys()
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][n], g, **tol)

    for m in (eager, compiled):
        m.eval()
    with torch.no_grad():
        reference = eager(x)
        torch.testing.assert_close(compiled(x), reference, **tol)
        torch.testing.assert_close(compiled(x), reference, **tol)  # the second call reads the fold cache
        for m in (eager, compiled):  # a changed adapter must not be served from a stale fold
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(2.0)
        changed = eager(x)
        assert not torch.equal(changed, reference)  # (ConvNeXt's layer scale starts at 1e-6: small, not zero)
        torch.testing.assert_close(compiled(x), changed, **tol)
        merge_lora(eager.model)
        merge_lora(compiled.model)
        torch.testing.assert_close(eager(x), changed, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(x), changed, **tol)


def test_compiled_logits_and_gradients_match_eager_in_train_eval_and_after_merge(aot_eager):
    _logits_match_in_train_eval_and_merged(*_pair("test_vit"), tol={"rtol": 1e-5, "atol": 1e-6})


def test_compile_leaves_state_dict_and_checkpoint_keys_unchanged_and_a_fit_step_trains(aot_eager, tmp_path):
    eager, compiled = _pair("test_vit")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    assert compiled.hparams.compile is True
    before = {k: v.clone() for k, v in compiled.state_dict().items() if "lora_B" in k}
    data = DataLoader(TensorDataset(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])), batch_size=2)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False)
    trainer.fit(compiled, data)
    after = compiled.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "the fit step changed no LoRA weight"
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any("_orig_mod" in k for k in saved["state_dict"])
    assert set(saved["state_dict"]) == compiled.checkpoint_state_keys()
    # The checkpoint of a compiled run loads into an eager model, which gives its logits.
    x = torch.randn(2, 3, 64, 64)
    reference = compiled.eval()(x).detach()
    rebuilt = LoRAClassifier.load_from_checkpoint(path, weights_only=True, compile=False).eval()
    torch.testing.assert_close(rebuilt(x).detach(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_inductor_compiled_logits_match_eager_in_train_eval_and_after_merge(backbone):
    torch._dynamo.reset()
    try:
        _logits_match_in_train_eval_and_merged(*_pair(backbone), tol={"rtol": 1e-4, "atol": 1e-5})
    finally:
        torch._dynamo.reset()
