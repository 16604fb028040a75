"""Hugging Face datasets as a data source: a dataset saved with `save_to_disk` or a local `load_dataset` spec, read
offline, its images decoded by our own decoder (as files are) and its `ClassLabel` / list-of-`ClassLabel` labels turned
into class indices / multi-hot targets. Needs the [hf] extra."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ..errors import VisionLoRAError, require
from .folder import stratified_split
from .samples import BadSample, load_sample

__all__ = ["HF_SPLITS", "HFImageDataset", "HFSource"]

HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _load(spec: str) -> Any:
    """The DatasetDict (or Dataset) of `spec`: `load_from_disk` for a `save_to_disk` folder, else `load_dataset`,
    offline unless the environment says otherwise (a hub name then fails in one line instead of retrying)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    datasets = require("datasets", "hf", "--data.hf")
    folder = Path(spec)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return datasets.load_from_disk(str(folder))
    try:
        return datasets.load_dataset(spec)
    except Exception as err:  # the library raises many types for a missing or unreachable dataset
        raise VisionLoRAError(
            f"data.hf {spec!r} could not be loaded offline ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "give a save_to_disk folder or a local dataset (set HF_HUB_OFFLINE=0 to allow the hub)."
        ) from None


def _label_kind(feature: Any) -> tuple[str, list[str] | None]:
    """("class", names) for a ClassLabel, ("classes", names) for a list of ClassLabel, ("string" / "strings", None)
    for text labels and ("int" / "ints", None) for plain integers; None names where the feature does not carry them."""
    from datasets import ClassLabel, LargeList, List, Value

    def plain(value: Any) -> str | None:
        if isinstance(value, Value) and value.dtype in ("string", "large_string"):
            return "string"
        if isinstance(value, Value) and value.dtype.startswith(("int", "uint")):
            return "int"
        return None

    if isinstance(feature, ClassLabel):
        return "class", list(feature.names)
    if isinstance(feature, (List, LargeList)):
        inner = feature.feature
        if isinstance(inner, ClassLabel):
            return "classes", list(inner.names)
        if plain(inner):
            return plain(inner) + "s", None
    if plain(feature):
        return plain(feature), None
    raise VisionLoRAError(
        f"the label column has type {feature}; use a ClassLabel, a list of ClassLabel, strings or integers."
    )


class HFImageDataset(Dataset):
    """One split of a Hugging Face dataset as `(image, target, key)` items (or `BadSample`), decoded from the stored
    bytes by `pipeline` like image files; keys are the stored file names, else `<split>[<row>]`.

    A map-style dataset: the DataModule's samplers shard it across DDP ranks, once (no `split_dataset_by_node`).
    """

    def __init__(self, table: Any, column: str, targets: list, pipeline: Callable, bad_files: str, name: str) -> None:
        from datasets import Image

        self.table = table.cast_column(column, Image(decode=False))  # {"bytes", "path"}: our decoder, not PIL's
        self.column, self.targets, self.pipeline, self.bad_files, self.name = column, targets, pipeline, bad_files, name

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Any, str] | BadSample:
        index, seed = key if isinstance(key, tuple) else (key, None)
        stored = self.table[int(index)][self.column]
        source = stored.get("bytes") or stored.get("path")
        name = stored.get("path") or f"{self.name}[{index}]"
        return load_sample(name, source, self.targets[index], self.pipeline, seed, self.bad_files)


class HFSource:
    """The splits of a Hugging Face dataset: `train`, `validation` (as val) and `test`; without a validation split a
    seeded split of train (stratified for single-label).

    Args:
        spec: a `save_to_disk` folder or a local `load_dataset` spec.
        image_column: the column of the images.
        label_column: the column of the labels: a ClassLabel (single-label), a list of ClassLabel (multi-label), or
            strings / integers or lists of them (class names: the sorted union; integers in numeric order).
        task: "auto" (multilabel for list labels), "multiclass" or "multilabel".
        val_fraction, seed: the held-out share and seed when there is no validation split.

    Raises:
        VisionLoRAError: a missing column or split, or labels of another type.
    """

    def __init__(
        self,
        spec: str,
        image_column: str = "image",
        label_column: str = "label",
        task: str = "auto",
        val_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        loaded = _load(spec)
        tables = dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
        unknown = [s for s in tables if s not in HF_SPLITS]
        if unknown or "train" not in tables:
            raise VisionLoRAError(
                f"data.hf {spec}: splits {', '.join(tables)}; need train (and optionally validation, test), "
                f"not {', '.join(unknown) or 'no train'}."
            )
        first = tables["train"]
        for column in (image_column, label_column):
            if column not in first.column_names:
                raise VisionLoRAError(
                    f"data.hf {spec} has no column {column!r} (columns: {', '.join(first.column_names)}); set "
                    "data.hf_image_column / data.hf_label_column."
                )
        kind, names = _label_kind(first.features[label_column])
        listed = kind in ("classes", "strings", "ints")
        self.task = ("multilabel" if listed else "multiclass") if task == "auto" else task
        if self.task == "multiclass" and listed:
            raise VisionLoRAError(f"data.hf {spec}: the labels are lists; set data.task multilabel (or auto).")
        raw = {HF_SPLITS[s]: t[label_column] for s, t in tables.items()}  # ints, or lists of ints / strings
        index = {n: i for i, n in enumerate(names or [])}
        if names is None:  # strings sorted as text, integers in numeric order (named by their decimal string)
            values = sorted({n for values in raw.values() for v in values for n in (v if listed else [v])})
            index, names = {v: i for i, v in enumerate(values)}, [str(v) for v in values]
        self.class_names = names
        self.spec, self.image_column, self.val_fraction, self.seed = spec, image_column, val_fraction, seed
        self._tables, self._targets = {}, {}
        for split, table in tables.items():
            name = HF_SPLITS[split]
            values = [v if kind in ("class", "classes") else _indices(v, index, listed) for v in raw[name]]
            self._tables[name], self._targets[name] = table, [self._target(v) for v in values]
        self.val_from_train = "val" not in self._tables
        if self.val_from_train:
            self._hold_out()

    def _target(self, value: Any) -> int | tuple[float, ...]:
        if self.task == "multiclass":
            return int(value)
        hot = [0.0] * len(self.class_names)
        for i in value if isinstance(value, list) else [value]:  # a list of ClassLabel comes back as ints
            hot[int(i)] = 1.0
        return tuple(hot)

    def _hold_out(self) -> None:
        import random

        table, targets = self._tables["train"], self._targets["train"]
        if self.task == "multiclass":
            keep, held = stratified_split(targets, self.val_fraction, self.seed)
        else:
            order = list(range(len(targets)))
            random.Random(self.seed).shuffle(order)
            num_val = min(max(1, round(self.val_fraction * len(order))), len(order) - 1)
            held, keep = sorted(order[:num_val]), sorted(order[num_val:])
        self._tables["val"], self._targets["val"] = table.select(held), [targets[i] for i in held]
        self._tables["train"], self._targets["train"] = table.select(keep), [targets[i] for i in keep]

    def splits(self) -> list[str]:
        """The splits present: train, val and test where there is one."""
        return [s for s in ("train", "val", "test") if s in self._tables]

    def samples(self, split: str) -> tuple[list[str], list]:
        """Keys and targets of `split` (keys: stored file names or `<split>[<row>]`), as `FolderSource.samples`."""
        if split not in self._tables:
            raise FileNotFoundError(f"data.hf {self.spec} has no {split} split.")
        return [f"{split}[{i}]" for i in range(len(self._targets[split]))], self._targets[split]

    def dataset(self, split: str, pipeline: Callable, bad_files: str) -> HFImageDataset:
        """The torch dataset of `split`."""
        self.samples(split)
        return HFImageDataset(
            self._tables[split], self.image_column, self._targets[split], pipeline, bad_files, f"{self.spec}:{split}"
        )

    def encoded_items(self, split: str) -> list[tuple[bytes, Any, str]]:
        """(encoded image bytes, target, key) of each sample of `split`, for `vision-lora optimize`."""
        dataset = self.dataset(split, pipeline=None, bad_files="skip")
        items = []
        for i in range(len(dataset)):
            stored = dataset.table[i][self.image_column]
            raw = stored.get("bytes") or Path(stored["path"]).read_bytes()
            items.append((raw, dataset.targets[i], stored.get("path") or f"{split}[{i}]"))
        return items

    def fingerprint(self, split: str) -> str:
        """The library's fingerprint of the split's table (changes with its content)."""
        return str(getattr(self._tables[split], "_fingerprint", ""))

    def split_settings(self) -> dict:
        """What decides the splits beyond the dataset (the held-out fraction and seed, where used)."""
        return {"val_fraction": self.val_fraction, "split_seed": self.seed} if self.val_from_train else {}


def _indices(value: Any, index: dict[str, int], listed: bool) -> int | list[int]:
    return [index[v] for v in value] if listed else index[value]
