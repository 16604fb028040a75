"""Weight averaging over what trains: an exponential moving average of the adapters and the head only.

Lightning's `EMAWeightAveraging` deep-copies and averages every parameter, the frozen backbone included, and keeps a
full-size model state in checkpoints that vision_lora's trimmed checkpoints cannot resume from. This one averages
the trainable tensors alone (kilobytes to a few megabytes) and evaluates with them: from each validation of the fit
until the next training epoch starts the model holds the averaged weights, so the val metrics, the best checkpoint,
its adapter and everything exported from it are the average; the live weights wait in the callback's state (saved in
every checkpoint, so a resumed run trains on from them).

    vision-lora fit ... --trainer.callbacks+=vision_lora.averaging.TrainableEMA --trainer.callbacks.decay=0.99
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

__all__ = ["TrainableEMA"]


class TrainableEMA(L.Callback):
    """Exponential moving average of the trainable parameters, evaluated and checkpointed in their place.

    Args:
        decay: the average's decay per optimizer step; the first steps use min(decay, (1 + t) / (10 + t)), so that
            the average is not dominated by the starting weights of a short run.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay is in (0, 1), got {decay}")
        self.decay = decay
        self.average: dict[str, Tensor] = {}
        self.live: dict[str, Tensor] | None = None  # the training weights while the average is in place
        self.updates = 0

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._trainable(pl_module)
        if set(self.average) != set(params):  # a fresh run (or another model): the average starts at the weights
            self.average = {name: p.detach().clone() for name, p in params.items()}
            self.updates = 0
        self._put_back_live(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self._trainable(pl_module).items():
            self.average[name].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self.live is not None:
            return
        params = self._trainable(pl_module)
        self.live = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(self.average[name])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._put_back_live(pl_module)

    @torch.no_grad()
    def _put_back_live(self, pl_module: L.LightningModule) -> None:
        if self.live is None:
            return
        for name, p in self._trainable(pl_module).items():
            p.copy_(self.live[name])
        self.live = None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": self.average, "live": self.live, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average, self.live = dict(state_dict["average"]), state_dict.get("live")
        self.updates = int(state_dict.get("updates", 0))
