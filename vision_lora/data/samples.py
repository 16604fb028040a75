"""Samples of an image dataset on their way to a batch: the dataset of image files, bad-file stand-ins, the
collate function that drops them, and the seeded, rank-sharded epoch sampler."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, default_collate

from ..errors import VisionLoRAError
from .decode import ImageSource

__all__ = [
    "BadSample",
    "BalancedEpochSampler",
    "CollatedBatch",
    "EpochSampler",
    "ImageFileDataset",
    "SkipBadCollate",
    "class_balanced_weights",
    "seeded_rngs",
]


class BadSample(NamedTuple):
    """What a dataset returns in place of an image it cannot read: its key (the path, or the sample's key in an
    optimized dataset) and why."""

    key: str
    reason: str = ""


class CollatedBatch(NamedTuple):
    """A batch as the collate function hands it over, before the DataModule strips the bookkeeping.

    Attributes:
        images: (B, 3, H, W) float, B may be 0.
        labels: (B,) long class indices, (B, num_classes) float multi-hot targets, or the B image paths for predict.
        keys: the B samples' keys: file paths for an image folder, sample keys for an optimized dataset.
        bad: keys and reasons of the samples of this batch that could not be read and were dropped.
        num_samples: samples drawn for this batch, readable or not.
        stage: "train", "val", "test" or "predict".
    """

    images: Tensor
    labels: Tensor | list[str]
    keys: list[str]
    bad: list[BadSample]
    num_samples: int
    stage: str


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the global torch, random and numpy generators (which timm's transforms draw from) for one sample.

    Afterwards torch's generator is restored exactly; random and numpy continue from a seed drawn from their own
    stream (restoring their full state costs more than decoding a small JPEG).
    """
    generator = torch.default_generator
    torch_state = generator.get_state()
    next_py, next_np = random.getrandbits(32), int(np.random.randint(2**31))
    generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.seed(next_py)
        np.random.seed(next_np)


def display_name(path: str) -> str:
    """`path` as text that can be printed and written to UTF-8 files: bytes of a file name that are not valid UTF-8
    (kept by Python as surrogates) are shown as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_sample(
    key: str, source: ImageSource, label: int | str, pipeline: Callable, seed: int | None, bad_files: str
) -> tuple[Tensor, int | str, str] | BadSample:
    """Decode and transform one sample, `(image, label, key)`, or a `BadSample` when it cannot be read.

    Raises:
        VisionLoRAError: the sample cannot be read and `bad_files` is "fail".
    """
    try:
        if seed is None:
            return pipeline(source), label, key
        with seeded_rngs(seed):
            return pipeline(source), label, key
    except Exception as err:  # PIL raises many types on malformed files
        if bad_files == "fail":
            raise VisionLoRAError(
                f"Cannot read image {key}: {err}. Fix or delete the file, or set bad_files='skip'."
            ) from err
        return BadSample(key, f"{type(err).__name__}: {err}")


class ImageFileDataset(Dataset):
    """Image files decoded and transformed by `pipeline`, labelled by class index, or by their path when `labels`
    is None. Items are `(image, label, path)`, or a `BadSample` for an unreadable file.

    Args:
        paths: image files.
        labels: class index of each file; None for unlabelled (predict) data.
        pipeline: file path -> tensor (see `ImagePipeline`).
        bad_files: "skip" returns a `BadSample` for an unreadable file, "fail" raises.
    """

    def __init__(
        self, paths: Sequence[str], labels: Sequence[int] | None, pipeline: Callable, bad_files: str = "skip"
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise VisionLoRAError(f"Got {len(paths)} paths but {len(labels)} labels.")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.pipeline = pipeline
        self.bad_files = bad_files

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int | str, str] | BadSample:
        # `EpochSampler` hands (index, seed): the augmentation of that sample is then seeded, so a resumed run
        # draws exactly the crops and flips an uninterrupted one would.
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[index]
        key = display_name(path)
        label = key if self.labels is None else self.labels[index]
        return load_sample(key, path, label, self.pipeline, seed, self.bad_files)


class EpochSampler(DistributedSampler):
    """A training shuffle that depends only on (seed, epoch key), yielding `(index, per-sample seed)` pairs, sharded
    across `num_replicas` ranks so that each sample is drawn by exactly one rank per epoch.

    A stopped and resumed run thus sees the same order and the same augmentations as one that was not. Every rank
    gets the same number of samples: the last `len(dataset) % num_replicas` of each epoch's permutation (a
    different few each epoch) are left out, where padding would instead train on some samples twice. The epoch
    key comes from `epoch_key` when given (the DataModule passes the trainer's optimizer-step count at the start of
    the epoch: unlike Lightning's epoch counter, it is already restored when a resumed run builds its first
    iterator), else from `set_epoch`. `epoch_key` may also return `(key, skip)`: the epoch's first `skip` samples of
    this rank were already trained on (a run resumed mid-epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        epoch_key: Callable[[], int] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch_key = epoch_key

    def __len__(self) -> int:
        return len(self.dataset) // self.num_replicas

    def _epoch(self) -> tuple[int, torch.Generator, int]:
        """(samples this rank already trained on this epoch, the epoch's generator, the base of its sample seeds)."""
        skip = 0
        if self.epoch_key is not None:
            key = self.epoch_key()
            self.epoch, skip = key if isinstance(key, tuple) else (key, 0)
        keyed = self.seed * 1_000_003 + self.epoch
        return skip, torch.Generator().manual_seed(keyed), keyed * len(self.dataset)

    def _mine(self, items: list) -> list:
        """This rank's share of the epoch's `items`: every num_replicas-th, the same count on every rank."""
        return items[self.rank : len(self) * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, generator, base = self._epoch()
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        return iter([(index, base + index) for index in self._mine(order)[skip:]])


def class_balanced_weights(labels: Sequence[int]) -> Tensor:
    """Sampling weight of each sample, 1 / (samples of its class): every class is drawn equally often. (N,)"""
    labels = torch.tensor(list(labels), dtype=torch.long)  # (N,)
    return 1.0 / torch.bincount(labels).double()[labels]


class BalancedEpochSampler(EpochSampler):
    """`EpochSampler` drawing `len(dataset)` samples per epoch with replacement by `weights` (e.g. equal per class),
    from a generator keyed by (seed, epoch key) only, so resumed runs and every DDP rank agree; the draw is sharded
    across ranks as `EpochSampler` shards its permutation, so each draw is trained on by exactly one rank.

    Args:
        dataset: the training dataset.
        weights: (N,) non-negative sampling weight of each sample.
        seed, epoch_key, num_replicas, rank: as in `EpochSampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        weights: Tensor,
        seed: int = 0,
        epoch_key: Callable[[], int] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, seed, epoch_key, num_replicas, rank)
        if len(weights) != len(dataset):
            raise VisionLoRAError(f"Got {len(weights)} sampling weights for {len(dataset)} samples.")
        self.weights = weights.double()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, generator, base = self._epoch()
        n = len(self.dataset)
        drawn = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        # the seed is keyed by the draw's position: an image drawn twice gets two different augmentations
        return iter([(drawn[j], base + j) for j in self._mine(list(range(n)))[skip:]])


class SkipBadCollate:
    """Collate function that drops `BadSample`s and carries keys and bad samples along as a `CollatedBatch`.

    Args:
        stage: the stage the loader serves, recorded in each batch.
        image_shape: (3, H, W) of the transformed images, used for a batch whose every sample is bad.
    """

    def __init__(self, stage: str, image_shape: tuple[int, int, int]) -> None:
        self.stage = stage
        self.image_shape = tuple(image_shape)

    def __call__(self, samples: list[tuple[Tensor, int | str, str] | BadSample]) -> CollatedBatch:
        good = [s for s in samples if not isinstance(s, BadSample)]
        bad = [s for s in samples if isinstance(s, BadSample)]
        keys = [s[2] for s in good]
        if good:
            images = default_collate([s[0] for s in good])
            targets = [s[1] for s in good]
            multi_hot = not isinstance(targets[0], (int, str))  # a tuple of 0/1 per class
            labels = (
                keys
                if self.stage == "predict"
                else torch.tensor(targets, dtype=torch.float32 if multi_hot else torch.long)
            )
        else:
            images = torch.empty((0, *self.image_shape))
            labels = [] if self.stage == "predict" else torch.empty(0, dtype=torch.long)
        return CollatedBatch(images, labels, keys, bad, len(samples), self.stage)
