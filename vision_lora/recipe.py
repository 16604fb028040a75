"""The choices `vision-lora fit` makes from the data when the user leaves them open: the number of epochs and the
augmentation strength. `benchmarks/recipes.py` is the study behind them.

Each choice is made once, before the Trainer and the modules are built, written into the run's config (so the saved
`config.yaml` is what ran and reproduces it) and printed as one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .data import FolderSource, augment_for, read_info
from .data.streaming import is_optimized

__all__ = ["Choice", "TARGET_STEPS", "augment_for", "epochs_for", "train_images"]

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


def epochs_for(train_images: int, batch_size: int) -> int:
    """Epochs of a run whose user gave none: about `TARGET_STEPS` optimizer steps, `MIN_EPOCHS` to `MAX_EPOCHS`."""
    steps_per_epoch = max(math.ceil(train_images / max(batch_size, 1)), 1)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def train_images(root: str, val_fraction: float, seed: int) -> tuple[int, int]:
    """(training images, classes) of an image folder or an optimized dataset, as the DataModule will split it."""
    if is_optimized(root):
        info = read_info(root)
        return int(info["counts"].get("train", 0)), len(info["class_names"])
    source = FolderSource(root, val_fraction, seed)
    return len(source.samples("train")[0]), len(source.class_names)
