"""Label files as a data source: a CSV or JSONL file of `path,label[,split]` rows with paths relative to a root
folder, single-label or multi-label, checked row by row before any training step."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
from pathlib import Path
from typing import Literal

from ..errors import VisionLoRAError
from .folder import stratified_split

__all__ = ["SPLITS", "TASKS", "LabelFileSource", "LabelRow", "read_label_rows", "resolve_task"]

SPLITS = ("train", "val", "test")
TASKS = ("auto", "multiclass", "multilabel")


class LabelRow:
    """One row of a label file: where it is (for messages), the image path as written, its labels and split."""

    __slots__ = ("line", "path", "labels", "split", "is_list")

    def __init__(self, line: int, path: str, labels: list[str], split: str | None, is_list: bool) -> None:
        self.line = line
        self.path = path
        self.labels = labels
        self.split = split
        self.is_list = is_list


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise VisionLoRAError(
            f"{file}:{line}: the label file is not UTF-8 (byte {err.start}); save it as UTF-8."
        ) from None


def _split_value(file: Path, line: int, value: object) -> str | None:
    if value is None or value == "":
        return None
    if value not in SPLITS:
        raise VisionLoRAError(f"{file}:{line}: split {value!r} is not one of train, val, test; fix the row.")
    return str(value)


CSV_DELIMITERS = (",", "\t", ";", "|")


def _header_key(name: str | None) -> str:
    return (name or "").strip().lower()


def _cell(record: dict, column: str) -> str:
    return (record.get(column) or "").strip()


def _csv_rows(file: Path, text: str, multilabel: bool, label_sep: str) -> list[LabelRow]:
    """Rows of a CSV whose delimiter is the first of `CSV_DELIMITERS` that splits the header into a `path` and a
    `label` column (Excel writes `;` in many locales, `.tsv` files tabs); header names match without case or spaces."""
    first = text.splitlines()[0] if text else ""
    fields = {d: [_header_key(f) for f in next(csv.reader([first], delimiter=d), [])] for d in CSV_DELIMITERS}
    delimiter = next((d for d, keys in fields.items() if {"path", "label"} <= set(keys)), ",")
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    header = [_header_key(f) for f in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise VisionLoRAError(
            f"{file}:1: the header has no column {missing[0]!r} (found {', '.join(header) or 'nothing'}); "
            "the columns are path,label and optionally split."
        )
    rows = []
    for record in reader:
        line = reader.line_num
        label = _cell(record, "label")
        labels = [p for p in label.split(label_sep if label_sep != " " else None) if p] if multilabel else [label]
        if not multilabel and not label:
            labels = []
        rows.append(
            LabelRow(line, _cell(record, "path"), labels, _split_value(file, line, _cell(record, "split")), False)
        )
    return rows


def _jsonl_rows(file: Path, text: str) -> list[LabelRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise VisionLoRAError(f"{file}:{line}: not a JSON object ({err.msg}); fix the row.") from None
        if not isinstance(record, dict) or "path" not in record or "label" not in record:
            raise VisionLoRAError(f'{file}:{line}: a row needs the keys "path" and "label"; fix the row.')
        label = record["label"]
        if isinstance(label, list):
            if not all(isinstance(x, str) for x in label):
                raise VisionLoRAError(f"{file}:{line}: a label list holds class names (strings); fix the row.")
            labels, is_list = list(label), True
        elif isinstance(label, str):
            labels, is_list = ([label] if label else []), False
        else:
            raise VisionLoRAError(f"{file}:{line}: label must be a string or a list of strings, not {label!r}.")
        rows.append(LabelRow(line, str(record["path"]), labels, _split_value(file, line, record.get("split")), is_list))
    return rows


def read_label_rows(file: str | os.PathLike, multilabel: bool, label_sep: str = " ") -> list[LabelRow]:
    """The rows of a CSV (`.csv`, `.tsv`) or JSON-lines (any other suffix, e.g. `.jsonl`) label file.

    Raises:
        FileNotFoundError: the file does not exist.
        VisionLoRAError: the file is not UTF-8, lacks a column, or has a malformed row (file and line named).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"Label file {file} does not exist; set data.labels to a CSV or JSONL file.")
    text = _read_text(file)
    if file.suffix.lower() in (".csv", ".tsv"):
        return _csv_rows(file, text, multilabel, label_sep)
    return _jsonl_rows(file, text)


def resolve_task(task: str, rows: list[LabelRow], file: str | os.PathLike) -> str:
    """The task of a label file: `task`, or for "auto" "multilabel" when a JSONL row's label is a list (printed),
    else "multiclass"."""
    if task not in TASKS:
        raise VisionLoRAError(f"data.task must be one of {', '.join(TASKS)}, not {task!r}.")
    if task != "auto":
        return task
    listed = next((r for r in rows if r.is_list), None)
    if listed is None:
        return "multiclass"
    print(f"data.task: multilabel ({file}:{listed.line} gives a list of labels)")
    return "multilabel"


def _resolve_path(file: Path, row: LabelRow, root: Path, real_root: str, allow_outside: bool) -> str:
    where = f"{file}:{row.line}"
    if not row.path:
        raise VisionLoRAError(f"{where}: the path is empty; fix the row.")
    given = Path(row.path)
    full = given if given.is_absolute() else root / given
    if not allow_outside:
        if given.is_absolute() or ".." in given.parts:
            raise VisionLoRAError(
                f"{where}: {row.path} is not inside data.root {root}; use a path relative to it, or set "
                "data.allow_outside_root true."
            )
        real = os.path.realpath(full)
        if os.path.commonpath([real, real_root]) != real_root:
            raise VisionLoRAError(
                f"{where}: {row.path} links outside data.root {root} (to {real}); set data.allow_outside_root true "
                "to allow it."
            )
    if not full.is_file():
        raise VisionLoRAError(f"{where}: image {full} does not exist; fix the path or remove the row.")
    return str(full)


class LabelFileSource:
    """The samples of a label file, with the same interface as `FolderSource` (class names, splits, samples).

    Args:
        labels: the CSV or JSONL file.
        root: the folder the paths of the file are relative to (default: the label file's folder).
        task: "multiclass", "multilabel", or "auto" (multilabel when a JSONL label is a list).
        classes: the class list and order; default the sorted union of the labels.
        label_sep: separator of several labels in a CSV label cell (multilabel).
        allow_outside_root: accept paths that leave `root` (absolute, `../`, symlinks out).
        val_fraction: share held out for val when the file has no val rows.
        seed: seed of that split.

    Raises:
        VisionLoRAError: a bad row, named by file and line.
    """

    def __init__(
        self,
        labels: str | os.PathLike,
        root: str | os.PathLike | None = None,
        task: Literal["auto", "multiclass", "multilabel"] = "auto",
        classes: list[str] | None = None,
        label_sep: str = " ",
        allow_outside_root: bool = False,
        val_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        self.file = Path(labels)
        self.root = Path(root) if root is not None else self.file.parent
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {self.root} does not exist; set it to the folder of the images.")
        self.val_fraction, self.seed = val_fraction, seed
        rows = read_label_rows(self.file, multilabel=task == "multilabel", label_sep=label_sep)
        if not rows:
            raise VisionLoRAError(f"{self.file}: the label file has no rows.")
        self.task = resolve_task(task, rows, self.file)
        rows = self._check_rows(rows, allow_outside_root)
        names = sorted({name for row in rows for name in row.labels})
        if classes is not None:
            allowed = set(classes)
            for row in rows:
                outside = [n for n in row.labels if n not in allowed]
                if outside:
                    raise VisionLoRAError(
                        f"{self.file}:{row.line}: label {outside[0]!r} is not in data.classes; add it there or fix "
                        "the row."
                    )
            names = list(classes)
        if len(names) < 2:
            raise VisionLoRAError(f"{self.file}: {len(names)} class found; a classifier needs at least two.")
        self.class_names = names
        self._index = {name: i for i, name in enumerate(names)}
        self._split(rows)

    def _check_rows(self, rows: list[LabelRow], allow_outside: bool) -> list[LabelRow]:
        real_root = os.path.realpath(self.root)
        seen: dict[str, LabelRow] = {}
        kept = []
        for row in rows:
            if self.task == "multiclass":
                if row.is_list:
                    raise VisionLoRAError(
                        f"{self.file}:{row.line}: a list of labels in a single-label file; set data.task multilabel."
                    )
                if not row.labels or not row.labels[0]:
                    raise VisionLoRAError(f"{self.file}:{row.line}: the label is empty; give the row its class.")
            path = _resolve_path(self.file, row, self.root, real_root, allow_outside)
            key = os.path.normpath(path)
            earlier = seen.get(key)
            if earlier is not None:
                if sorted(earlier.labels) != sorted(row.labels) or earlier.split != row.split:
                    raise VisionLoRAError(
                        f"{self.file}:{row.line}: {row.path} repeats line {earlier.line} with other labels or split; "
                        "keep one row per image."
                    )
                continue
            seen[key] = row
            row.path = path
            kept.append(row)
        return kept

    def _target(self, row: LabelRow) -> int | tuple[float, ...]:
        if self.task == "multiclass":
            return self._index[row.labels[0]]
        hot = [0.0] * len(self.class_names)
        for name in row.labels:
            hot[self._index[name]] = 1.0
        return tuple(hot)

    def _split(self, rows: list[LabelRow]) -> None:
        by_split: dict[str, list[LabelRow]] = {s: [] for s in SPLITS}
        for row in rows:
            by_split[row.split or "train"].append(row)
        self.val_from_train = not by_split["val"]
        if self.val_from_train:
            train = by_split["train"]
            if self.task == "multiclass":
                keep, held = stratified_split([self._index[r.labels[0]] for r in train], self.val_fraction, self.seed)
            else:  # a seeded random split
                order = list(range(len(train)))
                random.Random(self.seed).shuffle(order)
                num_val = min(max(1, round(self.val_fraction * len(train))), len(train) - 1)
                held, keep = sorted(order[:num_val]), sorted(order[num_val:])
            if not held:
                raise VisionLoRAError(f"{self.file}: too few train rows to hold any out for val; add val rows.")
            by_split["val"], by_split["train"] = [train[i] for i in held], [train[i] for i in keep]
        if not by_split["train"]:
            raise VisionLoRAError(f"{self.file}: no train rows; mark some rows split=train.")
        self._samples = {
            split: ([r.path for r in part], [self._target(r) for r in part]) for split, part in by_split.items() if part
        }
        if self.task == "multilabel":
            present = {i for hot in self._samples["train"][1] for i, v in enumerate(hot) if v}
            absent = [n for i, n in enumerate(self.class_names) if i not in present]
            if absent:
                warnings.warn(
                    f"{self.file}: class(es) {', '.join(absent)} never appear in train; the model cannot learn them.",
                    stacklevel=2,
                )

    def splits(self) -> list[str]:
        """The splits present: train, val (own rows or held out of train) and test where there is one."""
        return list(self._samples)

    def samples(self, split: str) -> tuple[list[str], list]:
        """Paths and targets of `split` (class indices; multi-hot tuples for multilabel).

        Raises:
            FileNotFoundError: `split` has no rows.
        """
        if split not in self._samples:
            raise FileNotFoundError(f"{self.file} has no {split} rows; add rows with split={split}.")
        return self._samples[split]

    def split_settings(self) -> dict:
        """What decides the splits beyond the file itself (the held-out fraction and seed, where used)."""
        return {"val_fraction": self.val_fraction, "split_seed": self.seed} if self.val_from_train else {}
