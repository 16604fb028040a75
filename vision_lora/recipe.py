"""The choices `vision-lora fit` makes from the data when the user leaves them open (`--recipe auto`): which
augmentation and, on imbalanced classes, which handling of the imbalance, decided on the run's own val split by a
short screen of candidates (`screen.RecipeScreen`), and how long, from the val curve. `benchmarks/recipes.py` is
the study behind the numbers; docs/recipes.md has its results.

The decision is written into the run's config (so the saved `config.yaml` reproduces the winner without the screen)
and printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUGMENTS",
    "RECIPES",
    "Candidate",
    "Choice",
    "Length",
    "Plan",
    "IMBALANCE_RATIO",
    "candidates_for",
    "choose_recipe",
    "imbalance_of",
    "length_for",
]

AUGMENTS = ("auto", "none", "light", "standard")
RECIPES = ("auto", "off")


@dataclass(frozen=True)
class Choice:
    """One option the recipe set: its dotted config key, the value, and why."""

    option: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"recipe: {self.option}={self.value} ({self.reason})"


@dataclass(frozen=True)
class Candidate:
    """A recipe the screen tries: a name and the options it sets (dotted config keys)."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Length:
    """How long a run whose length the val curve decides trains, in epochs: each screened candidate's `rung`, the
    `patience` without improvement that ends it, and a minimum and cap of the continued run's own epochs."""

    rung: int
    patience: int
    min_epochs: int
    max_epochs: int


# In optimizer steps, turned into epochs per dataset: a candidate's rung, the patience, the continued run's minimum
# and cap (never fewer than MIN_CAP_EPOCHS epochs, the plain loop's length, nor more than MAX_CAP_EPOCHS).
RUNG_STEPS, PATIENCE_STEPS, MIN_STEPS, CAP_STEPS = 40, 40, 40, 600
MIN_CAP_EPOCHS, MAX_CAP_EPOCHS = 10, 100
# The largest over the smallest class of train at or over which the screen also tries class-balanced sampling and a
# class-weighted loss (below it they change little and would only cost rungs); which one wins is decided on val.
IMBALANCE_RATIO = 2.0
_NO_HANDLING = {"data.sampler": "shuffle", "model.class_weights": "none"}
_HANDLING = {"balanced": {"data.sampler": "balanced", "model.class_weights": "none"},
             "weighted": {"data.sampler": "shuffle", "model.class_weights": "auto"}}  # fmt: skip


def candidates_for(hflip: float) -> list[Candidate]:
    """The augmentations the screen tries: the plain loop's (resize and centre crop, plus a flip where the user allows
    flips: "light", else "none") and timm's standard.

    Where flips are allowed, "none" is not a candidate beside "light": a short rung favours it (it fits the training
    images fastest) on a val split drawn from the same photos as train, and it generalised worse than "light" where
    the study ran both (docs/recipes.md).
    """
    names = ["light", "standard"] if hflip > 0 else ["none", "standard"]
    return [Candidate(name, {"data.augment": name}) for name in names]


def imbalance_of(counts: list[int] | None) -> float:
    """The largest over the smallest training class count (classes without images left out); 1.0 when unknown."""
    present = [c for c in counts or [] if c > 0]
    return max(present) / min(present) if present else 1.0


def _with_imbalance(augments: list[Candidate]) -> list[Candidate]:
    """`augments` without imbalance handling, then the plain loop's augmentation (the first) with each handling."""
    plain = augments[0]
    return [
        *(Candidate(c.name, {**c.options, **_NO_HANDLING}) for c in augments),
        *(Candidate(f"{plain.name}+{name}", {**plain.options, **opts}) for name, opts in _HANDLING.items()),
    ]


def length_for(train_images: int, batch_size: int, candidates: int) -> Length:
    """The `Length` rules for `train_images` at `batch_size`, screening `candidates` recipes.

    The continued run's minimum is at least the losing candidates' epochs, so that a fit's optimizer steps, screen
    included, stay within twice those of one run of the chosen length.
    """
    per_epoch = max(math.ceil(train_images / max(batch_size, 1)), 1)

    def epochs(steps: int) -> int:
        return max(math.ceil(steps / per_epoch), 1)

    rung = epochs(RUNG_STEPS) if candidates > 1 else 0
    minimum = max(epochs(MIN_STEPS), (candidates - 1) * rung, rung + 1, 2)
    cap = max(minimum, min(MAX_CAP_EPOCHS, max(MIN_CAP_EPOCHS, epochs(CAP_STEPS))))
    return Length(rung=rung, patience=epochs(PATIENCE_STEPS), min_epochs=minimum, max_epochs=cap)


@dataclass
class Plan:
    """What `choose_recipe` decided before the run: the choices made outright, the candidates to screen (one: no
    screen), and the length rules when the val curve decides the length (None: the user gave it)."""

    choices: list[Choice]
    candidates: list[Candidate]
    length: Length | None


def choose_recipe(
    config: Any, counts: Callable[[], tuple[int, int]], class_counts: Callable[[], list[int] | None] | None = None
) -> Plan:
    """Decide, in `config` itself, what the user of `fit` left open, and plan the rest for the run.

    With `recipe: auto` and `data.augment: auto`, the augmentation is screened on val (the plan's candidates; the
    config gets the first, the screen switches). With `recipe: off`, "auto" is the plain loop's "light". When neither
    `trainer.max_epochs` nor `trainer.max_steps` is given, the val curve decides the length (the plan's `length`;
    `trainer.max_epochs` becomes its cap, screen included). A screen or a curve-decided length trains at a constant
    learning rate (`model.schedule: auto` becomes "constant"); otherwise "auto" is the cosine decay.

    With `recipe: auto`, `data.sampler` and `model.class_weights` both left open and single-label classes whose
    largest / smallest training count is at least `IMBALANCE_RATIO`, the screen also tries the plain loop's
    augmentation with class-balanced sampling and with a class-weighted loss, and the run monitors
    `val_balanced_acc` where it would monitor `val_acc`.

    Args:
        config: the parsed `fit` config (its `recipe`, `model`, `data`, `trainer` and `checkpoint` groups).
        counts: returns (training images, classes) of the data; called only when a choice is needed.
        class_counts: returns training images per class (None for multi-label data); called only when the imbalance
            handling is left open.
    """
    data, trainer, model = config.data, config.trainer, config.model
    needs_length = trainer.get("max_epochs") is None and trainer.get("max_steps") in (None, -1)
    open_augment = data.get("augment") == "auto"
    auto = config.get("recipe", "auto") == "auto"
    open_imbalance = auto and data.get("sampler") is None and model.get("class_weights") is None
    has_data = any(data.get(k) is not None for k in ("root", "labels", "hf"))
    if not has_data or not (needs_length or open_augment or open_imbalance):
        return Plan([], [], None)
    choices = []
    candidates = candidates_for(float(data.get("hflip", 0.5))) if auto and open_augment else []
    ratio = imbalance_of(class_counts()) if open_imbalance and class_counts is not None else 1.0
    if ratio >= IMBALANCE_RATIO:
        candidates = _with_imbalance(candidates or [Candidate(str(data.get("augment")), {})])
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and checkpoint.get("monitor") == "val_acc":
            checkpoint.monitor, checkpoint.filename = "val_balanced_acc", "best-{epoch:02d}-{val_balanced_acc:.4f}"
            reason = f"imbalanced classes: the largest has {ratio:.1f}x the training images of the smallest"
            choices.append(Choice("checkpoint.monitor", "val_balanced_acc", reason))
    if open_augment and not candidates:
        data.augment = "light"
        choices.append(Choice("data.augment", "light", "the plain loop's augmentation; --recipe off"))
    if not needs_length and not candidates:
        return Plan(choices, [], None)
    images, _ = counts()
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(nodes)
    batch = data.batch_size * world  # images per optimizer step, across processes
    per_epoch = max(math.ceil(images / max(batch, 1)), 1)
    length = length_for(images, batch, max(len(candidates), 1))
    for key, value in candidates[0].options.items() if candidates else ():
        group, name = key.split(".", 1)
        config[group][name] = value
    if needs_length:
        losers = max(len(candidates) - 1, 0) * length.rung
        trainer.max_epochs = losers + length.max_epochs
        reason = (f"{images} training images, {per_epoch} steps per epoch: the val curve decides, "
                  f"{length.min_epochs} to {length.max_epochs} epochs, patience {length.patience}")  # fmt: skip
        choices.append(Choice("trainer.max_epochs", trainer.max_epochs, reason + (" (+ the screen)" if losers else "")))
    elif candidates:  # the user's length: the winner trains that many epochs, the losers at most as many in all
        given = int(trainer.get("max_epochs") or math.ceil(int(trainer.max_steps) / per_epoch))
        rung = max(1, min(length.rung, given // (2 * (len(candidates) - 1))))
        length = Length(rung=rung, patience=length.patience, min_epochs=given, max_epochs=given)
        if trainer.get("max_epochs"):
            trainer.max_epochs = given + (len(candidates) - 1) * rung
        else:
            trainer.max_steps = int(trainer.max_steps) + (len(candidates) - 1) * rung * per_epoch
    if (candidates or needs_length) and model.get("schedule", "auto") == "auto":
        model.schedule = "constant"
        choices.append(Choice("model.schedule", "constant", "a length decided during the run"))
    return Plan(choices, candidates if len(candidates) > 1 else [], length if (needs_length or candidates) else None)
