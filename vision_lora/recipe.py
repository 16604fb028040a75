"""The choices `vision-lora fit` makes from the data when the user leaves them open: the number of epochs and the
augmentation strength. `benchmarks/recipes.py` is the study behind them; docs/recipes.md has its results.

Each choice is made once, before the Trainer and the modules are built, written into the run's config (so the saved
`config.yaml` is what ran and reproduces it) and printed as one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUGMENTS",
    "AUGMENT_STANDARD_FROM",
    "Choice",
    "TARGET_STEPS",
    "augment_for",
    "choose_recipe",
    "epochs_for",
]

AUGMENTS = ("auto", "none", "light", "standard")
# From this many training images per class on, "auto" augmentation is "standard" (random-resized crops and colour
# jitter), below it "light" (resize + flip); the smallest size the recipe study measured.
AUGMENT_STANDARD_FROM = 10
# About this many optimizer steps when the user gives no epoch count, within MIN_EPOCHS..MAX_EPOCHS.
TARGET_STEPS = 150
MIN_EPOCHS, MAX_EPOCHS = 5, 30


@dataclass(frozen=True)
class Choice:
    """One option the recipe set: its dotted config key, the value, and why."""

    option: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"recipe: {self.option}={self.value} ({self.reason})"


def augment_for(train_images: int, num_classes: int) -> str:
    """The augmentation "auto" picks for `train_images` training images in `num_classes` classes."""
    return "standard" if train_images / max(num_classes, 1) >= AUGMENT_STANDARD_FROM else "light"


def epochs_for(train_images: int, batch_size: int) -> int:
    """Epochs of a run whose user gave none: about `TARGET_STEPS` optimizer steps, `MIN_EPOCHS` to `MAX_EPOCHS`."""
    steps_per_epoch = max(math.ceil(train_images / max(batch_size, 1)), 1)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def choose_recipe(config: Any, counts: Callable[[], tuple[int, int]]) -> list[Choice]:
    """Fill in what the user of `fit` left to the data, in `config` itself (so the saved config.yaml is what ran):
    the epoch count when neither trainer.max_epochs nor trainer.max_steps is given, and data.augment "auto".

    Args:
        config: the parsed `fit` config (its `data` and `trainer` groups).
        counts: returns (training images, classes) of the data; called only when a choice is needed.
    """
    data, trainer = config.data, config.trainer
    needs_epochs = trainer.get("max_epochs") is None and trainer.get("max_steps") in (None, -1)
    needs_augment = data.get("augment") == "auto"
    if data.get("root") is None or not (needs_epochs or needs_augment):
        return []
    images, classes = counts()
    choices = []
    if needs_epochs:
        trainer.max_epochs = epochs_for(images, data.batch_size)
        steps = -(-images // data.batch_size)
        reason = f"{images} training images, {steps} steps of {data.batch_size} per epoch"
        choices.append(Choice("trainer.max_epochs", trainer.max_epochs, reason))
    if needs_augment:
        data.augment = augment_for(images, classes)
        per_class = images / max(classes, 1)
        choices.append(Choice("data.augment", data.augment, f"{per_class:.0f} training images per class"))
    return choices
