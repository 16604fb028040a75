from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import FAST, Crash
from torch.utils.data import DataLoader, TensorDataset

from vision_lora.averaging import TrainableEMA
from vision_lora.cli import main


class _Line(L.LightningModule):
    """y = w·x + b with a frozen "backbone" scale; SGD steps recorded for the reference average."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.zeros(1))
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        self.trajectory: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.frozen * self.w * x + self.b - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.trajectory.append(torch.cat([self.w.detach(), self.b.detach()]).clone())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self.w * x + self.b - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_average_is_the_ema_of_the_trainable_weights_and_is_what_validation_sees():
    x = torch.linspace(-1, 1, 16)[:, None]
    data = DataLoader(TensorDataset(x, 3 * x + 1), batch_size=4)
    model, ema = _Line(), TrainableEMA(decay=0.9)
    seen = []

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen.append(torch.cat([pl_module.w.detach(), pl_module.b.detach()]).clone())

    trainer = L.Trainer(max_epochs=3, callbacks=[ema, Spy()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, data, data)
    expected = torch.zeros(2)  # the starting weights
    averages = []
    for t, weights in enumerate(model.trajectory, start=1):
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * weights
        averages.append(expected.clone())
    assert "frozen" not in ema.average
    torch.testing.assert_close(torch.cat([ema.average["w"], ema.average["b"]]), expected)
    # Each epoch's validation saw the average of that epoch's end (Spy runs after the swap), not the live weights.
    for epoch, weights in enumerate(seen):
        torch.testing.assert_close(weights, averages[4 * epoch + 3])
    assert not torch.allclose(seen[-1], model.trajectory[-1])


def test_a_run_with_averaging_resumes_bit_for_bit_and_its_checkpoint_holds_the_average(
    image_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *FAST, f"--data.root={image_folder}", "--trainer.max_epochs=2", "--seed_everything=3"]
    args += ["--trainer.callbacks+=vision_lora.averaging.TrainableEMA", "--trainer.callbacks.decay=0.8"]
    main([*args, "--trainer.logger.init_args.name=straight"])
    with pytest.raises(Crash):
        main([*args, "--trainer.logger.init_args.name=stopped", "--trainer.callbacks+=helpers.CrashMidEpoch"])
    main([*args, "--trainer.logger.init_args.name=stopped", "--ckpt_path=last"])
    straight = torch.load(tmp_path / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "runs/stopped/version_0/checkpoints/last.ckpt", weights_only=True)
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    state = next(v for k, v in straight["callbacks"].items() if k.startswith("TrainableEMA"))
    # The checkpoint's weights are the average; the live ones wait in the callback's state, trainable tensors only.
    for name, value in state["average"].items():
        torch.testing.assert_close(straight["state_dict"][name], value, rtol=0, atol=0)
    assert set(state["live"]) == set(state["average"]) and not all(
        torch.equal(state["live"][n], state["average"][n]) for n in state["live"]
    )
    assert set(state["average"]) == {k for k in straight["state_dict"] if "lora_" in k or k.startswith("model.fc.")}


def test_averaging_with_the_recipe_screen_is_refused_in_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *FAST, f"--data.root={image_folder}", "--data.augment=auto"]
    with pytest.raises(SystemExit):
        main([*args, "--trainer.callbacks+=vision_lora.averaging.TrainableEMA"])
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        "vision-lora: error: Weight averaging (TrainableEMA) cannot run in the recipe screen: give --data.augment or "
        "--recipe off."
    ]
