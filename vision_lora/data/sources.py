"""Which source a run's data options name (an image folder, an optimized dataset, a label file, a Hugging Face
dataset), opened once with its class map and task; and the training counts the recipe needs before any DataModule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import VisionLoRAError
from .folder import FolderSource
from .hf import HFSource
from .labels import LabelFileSource
from .streaming import is_optimized, read_info

__all__ = ["class_counts", "class_counts_of", "open_source", "train_counts", "train_counts_of"]

Source = FolderSource | LabelFileSource | HFSource


def open_source(data: Mapping[str, Any]) -> tuple[Source | None, dict | None, list[str] | None, str | None]:
    """(source, optimized-dataset info, class names, task) of the DataModule options `data` (its hparams).

    The task is "multiclass" or "multilabel"; None (with no classes) when there is no data (predict from a
    checkpoint alone).

    Raises:
        VisionLoRAError: two sources at once, or a multi-label task on an image folder.
    """
    task, root = data.get("task", "auto"), data.get("root")
    if data.get("labels") is not None and data.get("hf") is not None:
        raise VisionLoRAError("Give data.labels or data.hf, not both.")
    split = {"val_fraction": data.get("val_fraction", 0.15), "seed": data.get("seed", 0)}
    if data.get("hf") is not None:
        source = HFSource(
            data["hf"], data.get("hf_image_column", "image"), data.get("hf_label_column", "label"), task, **split
        )
        return source, None, source.class_names, source.task
    if data.get("labels") is not None:
        keys = ("classes", "label_sep", "allow_outside_root")
        source = LabelFileSource(data["labels"], root, task, **{k: data[k] for k in keys if k in data}, **split)
        return source, None, source.class_names, source.task
    if root is None:
        return None, None, None, None if task == "auto" else task
    if is_optimized(root):
        info = read_info(root)
        return None, info, list(info["class_names"]), info.get("task", "multiclass") if task == "auto" else task
    if task == "multilabel":
        raise VisionLoRAError(
            "data.task multilabel needs a label file (data.labels), a Hugging Face dataset (data.hf) or an optimized "
            "multi-label dataset; an image folder has one class per image."
        )
    source = FolderSource(root, split["val_fraction"], split["seed"])
    return source, None, source.class_names, "multiclass"


def train_counts_of(data: Mapping[str, Any]) -> tuple[int, int]:
    """(training images, classes) of the data options of a run (`--data.*`: any source), as the DataModule will
    split them."""
    source, info, class_names, _ = open_source(data)
    if info is not None:
        return int(info["counts"].get("train", 0)), len(class_names)
    if source is None:
        raise VisionLoRAError("data.root (or data.labels / data.hf) is required to fit.")
    return len(source.samples("train")[0]), len(class_names)


def class_counts(source: Any, num_classes: int) -> list[int]:
    """Training images per class of an opened folder, label-file or HF source (multi-label: positives per class)."""
    counts = [0] * num_classes
    for target in source.samples("train")[1]:
        if isinstance(target, (tuple, list)):  # multi-hot
            for i, value in enumerate(target):
                counts[i] += int(value > 0)
        else:
            counts[int(target)] += 1
    return counts


def class_counts_of(data: Mapping[str, Any]) -> list[int] | None:
    """Training images per class of a single-label run's data options, as the DataModule will split them; None for
    multi-label or optimized data (whose per-class counts are not read before training)."""
    source, _, class_names, task = open_source(data)
    if source is None or task != "multiclass" or not class_names:
        return None
    return class_counts(source, len(class_names))


def train_counts(root: str, val_fraction: float, seed: int) -> tuple[int, int]:
    """(training images, classes) of an image folder or an optimized dataset, as the DataModule will split it."""
    return train_counts_of({"root": root, "val_fraction": val_fraction, "seed": seed})
