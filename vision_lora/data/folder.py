"""Image folders as a data source: the class map of `root/train/<class>/`, the samples of each split, and the
seeded stratified split of train/ when there is no val/."""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from ..errors import VisionLoRAError
from ..preprocess import eval_transform
from .decode import IMAGE_EXTENSIONS, decode_image, load_rgb

__all__ = ["FolderSource", "image_files", "labelled_images", "preprocess_files", "readable_files", "stratified_split"]


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split sample indices into train and val class by class, reproducibly for a given seed.

    Every class with at least two samples gets at least one val sample and keeps at least one train sample.

    Returns:
        The sorted train indices and the sorted val indices.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        num_val = min(max(1, round(val_fraction * len(indices))), len(indices) - 1)
        val += indices[:num_val]
        train += indices[num_val:]
    return sorted(train), sorted(val)


def _walk_images(top: str) -> list[str]:
    """The visible image files under `top`, sorted, following symlinked folders once each (a symlink loop is walked
    once, not until the OS gives up); hidden files and folders left out."""
    found, seen = [], set()
    for root, dirs, files in os.walk(top, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def image_files(folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The visible image files under `folder` (recursively, hidden files and folders left out), sorted; or
    `[folder]` when it is a single file. With `limit`, at most that many, spread evenly over the sorted list so that
    every class folder is represented.

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if folder.is_file():
        return [str(folder)]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist.")
    paths = _walk_images(str(folder))
    if not paths:
        raise FileNotFoundError(f"No images in {folder} (extensions {' '.join(IMAGE_EXTENSIONS)}).")
    if limit is not None and len(paths) > limit:
        paths = [paths[i * len(paths) // limit] for i in range(limit)]
    return paths


def labelled_images(split_dir: str | os.PathLike, class_names: list[str]) -> tuple[list[str], list[int]]:
    """The images of `split_dir/<class>/` with their class indices in `class_names` order.

    Raises:
        VisionLoRAError: a class folder whose name is not among `class_names`.
    """
    split_dir = Path(split_dir)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in index]
    if unknown:
        raise VisionLoRAError(f"{split_dir} has class folder {unknown[0]!r}, which is not a class of the model.")
    paths = image_files(split_dir)
    return paths, [index[Path(p).relative_to(split_dir).parts[0]] for p in paths]


def preprocess_files(paths: list[str] | list[Path], data_config: dict) -> Tensor:
    """The preprocessed batch (N, C, H, W) of image files, with the eval transform of `data_config`."""
    transform = eval_transform(data_config)
    return torch.stack([transform(load_rgb(p)) for p in paths])


def readable_files(paths: list[str] | list[Path], data_config: dict) -> tuple[list[int], Tensor]:
    """The positions in `paths` of the files that decode (under the pixel limit), and their batch (N, C, H, W)
    preprocessed with the eval transform of `data_config`; each file that does not is skipped with a
    `path<TAB>skipped: why` line on stderr, as training and `predict` skip bad files.

    Raises:
        VisionLoRAError: none of `paths` could be read.
    """
    import sys

    transform = eval_transform(data_config)
    kept, tensors = [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(transform(decode_image(Path(path).read_bytes())))
        except (OSError, VisionLoRAError) as err:
            print(f"{path}\tskipped: {err}", file=sys.stderr)
            continue
        kept.append(i)
    if not kept:
        raise VisionLoRAError(f"none of the {len(paths)} images could be read (from {paths[0] if paths else '-'}).")
    return kept, torch.stack(tensors)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _scan_split(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
        if (split_dir / name).is_dir():
            found = _walk_images(str(split_dir / name))
            paths += found
            labels += [index] * len(found)
    return paths, labels


class FolderSource:
    """The samples of `root/train/<class>/<image>`, `root/val/...` and optionally `root/test/...`.

    Class indices follow the sorted folder names of `train/`. Without `val/`, a stratified, seeded split of
    `train/` is the validation set. Everything is scanned here, so that a class missing from train/ fails before
    any training.

    Args:
        root: the dataset folder.
        val_fraction: share of each class of `train/` held out for validation when there is no `val/`.
        seed: seed of that split.

    Raises:
        FileNotFoundError / VisionLoRAError: the layout is wrong, with what to change.
    """

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.15, seed: int = 0) -> None:
        self.root = Path(root)
        self.val_fraction = val_fraction
        self.seed = seed
        train_dir = self.root / "train"
        if not self.root.is_dir():
            raise FileNotFoundError(f"Dataset folder {self.root} does not exist; set root to a folder holding train/.")
        if not train_dir.is_dir():
            raise FileNotFoundError(f"{train_dir} does not exist; the layout is {self.root}/train/<class>/<image>.")
        self.class_names = _class_folders(train_dir)
        self._class_to_idx = {name: index for index, name in enumerate(self.class_names)}
        paths, labels = _scan_split(train_dir, self._class_to_idx)
        if not paths:
            raise FileNotFoundError(
                f"No images in {train_dir}; the layout is {train_dir}/<class>/<image> with an extension among "
                f"{' '.join(IMAGE_EXTENSIONS)}."
            )
        if len(self.class_names) < 2:
            raise VisionLoRAError(
                f"{train_dir} has {len(self.class_names)} class folder ({', '.join(self.class_names)}); "
                "a classifier needs at least two."
            )
        found = set(labels)
        for index, name in enumerate(self.class_names):
            if index not in found:
                warnings.warn(f"Class folder {train_dir / name} has no images; the class is kept.", stacklevel=2)
        self._samples: dict[str, tuple[list[str], list[int]]] = {}
        val, test = self._scan_labelled("val"), self._scan_labelled("test")
        self.val_from_train = val is None
        if val is None:
            keep, held = stratified_split(labels, val_fraction, seed)
            if not held:
                raise VisionLoRAError(
                    f"No class of {train_dir} has two images, so none can be held out for validation; "
                    f"add images or a {self.root / 'val'} folder."
                )
            val = [paths[i] for i in held], [labels[i] for i in held]
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        self._samples = {"train": (paths, labels), "val": val}
        if test is not None:
            self._samples["test"] = test

    def _scan_labelled(self, split: str) -> tuple[list[str], list[int]] | None:
        split_dir = self.root / split
        if not split_dir.is_dir():
            return None
        unknown = [name for name in _class_folders(split_dir) if name not in self._class_to_idx]
        if unknown:
            raise VisionLoRAError(
                f"{split_dir} has class folder '{unknown[0]}' that {self.root / 'train'} lacks; "
                f"add training images for it or remove {split_dir / unknown[0]}."
            )
        paths, labels = _scan_split(split_dir, self._class_to_idx)
        if not paths:
            raise FileNotFoundError(f"No images in {split_dir}; add {split_dir}/<class>/<image> or remove the folder.")
        return paths, labels

    def splits(self) -> list[str]:
        """The splits present: train, val (own folder or held out of train) and test where there is one."""
        return list(self._samples)

    def samples(self, split: str) -> tuple[list[str], list[int]]:
        """Paths and class indices of `split`.

        Raises:
            FileNotFoundError: `split` is "test" and there is no `root/test/`.
        """
        if split not in self._samples:
            raise FileNotFoundError(
                f"Testing needs {self.root / split}/<class>/<image>; create it or use validate instead."
            )
        return self._samples[split]

    def split_settings(self) -> dict:
        """What decides the splits beyond the files themselves (the held-out fraction and seed, where used)."""
        return {"val_fraction": self.val_fraction, "split_seed": self.seed} if self.val_from_train else {}
