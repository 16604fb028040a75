"""Image folders as a LightningDataModule: class map, transforms from the timm data config, bad-file policy."""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate
from torchvision.datasets.folder import make_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadSample",
    "CollatedBatch",
    "EpochSampler",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "SkipBadCollate",
    "load_rgb",
    "stratified_split",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
STAGES = ("train", "val", "test", "predict")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, upright according to its EXIF orientation.

    Transparent pixels are composited on white; 16-bit grayscale is scaled to 0..255 rather than clipped.

    Raises:
        OSError: the file is missing or not a readable image (PIL's errors pass through).
    """
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257  # 65535 -> 255
        image = Image.fromarray(np.round(levels).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


class BadSample(NamedTuple):
    """What a dataset returns in place of an image it cannot read."""

    path: str


class CollatedBatch(NamedTuple):
    """A batch as the collate function hands it over, before the DataModule strips the bad-file bookkeeping.

    Attributes:
        images: (B, 3, H, W) float, B may be 0.
        labels: (B,) long class indices, or the B image paths for predict.
        bad_paths: files of this batch that could not be read and were dropped.
        num_samples: samples drawn for this batch, readable or not.
        stage: "train", "val", "test" or "predict".
    """

    images: Tensor
    labels: Tensor | list[str]
    bad_paths: list[str]
    num_samples: int
    stage: str


class ImageFileDataset(Dataset):
    """Images read with `load_rgb` and transformed, labelled by class index, or by their path when `labels` is None.

    Args:
        paths: image files.
        labels: class index of each file; None for unlabelled (predict) data.
        transform: applied to each RGB PIL image.
        bad_files: "skip" returns a `BadSample` for an unreadable file, "fail" raises.
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int] | None,
        transform: Callable[[Image.Image], Tensor],
        bad_files: str = "skip",
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"Got {len(paths)} paths but {len(labels)} labels.")
        self.paths = paths
        self.labels = labels
        self.transform = transform
        self.bad_files = bad_files

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int | str] | BadSample:
        # `EpochSampler` hands (index, seed): the augmentation of that sample is then seeded, so a resumed run
        # draws exactly the crops and flips an uninterrupted one would.
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises many types on malformed files
            if self.bad_files == "fail":
                raise ValueError(
                    f"Cannot read image {path}: {err}. Fix or delete the file, or set bad_files='skip'."
                ) from err
            return BadSample(path)
        label = path if self.labels is None else self.labels[index]
        if seed is None:
            return self.transform(image), label
        with _seeded_rngs(seed):
            return self.transform(image), label


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
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


class EpochSampler(RandomSampler):
    """A shuffle that depends only on (seed, epoch key), yielding `(index, per-sample seed)` pairs.

    A stopped and resumed run thus sees the same order and the same augmentations as one that was not. The epoch key
    comes from `epoch_key` when given (the DataModule passes the trainer's optimizer-step count at the start of the
    epoch: unlike Lightning's epoch counter, it is already restored when a resumed run builds its first iterator),
    else from `set_epoch`. Under DDP Lightning swaps in its DistributedSampler (seeded by epoch; augmentations then
    draw from the worker's generator).
    """

    def __init__(self, data_source: Dataset, seed: int = 0, epoch_key: Callable[[], int] | None = None) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self.epoch_key = epoch_key

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.epoch_key is not None:
            self.epoch = self.epoch_key()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * len(order)
        return iter([(index, base + index) for index in order])


class SkipBadCollate:
    """Collate function that drops `BadSample`s and carries their paths along as a `CollatedBatch`.

    Args:
        stage: the stage the loader serves, recorded in each batch.
        image_shape: (3, H, W) of the transformed images, used for a batch whose every sample is bad.
    """

    def __init__(self, stage: str, image_shape: tuple[int, int, int]) -> None:
        self.stage = stage
        self.image_shape = tuple(image_shape)

    def __call__(self, samples: list[tuple[Tensor, int | str] | BadSample]) -> CollatedBatch:
        good = [s for s in samples if not isinstance(s, BadSample)]
        bad_paths = [s.path for s in samples if isinstance(s, BadSample)]
        if good:
            images, labels = default_collate(good)
            if self.stage == "predict":
                labels = list(labels)  # default_collate leaves the paths as a tuple
        else:
            images = torch.empty((0, *self.image_shape))
            labels = [] if self.stage == "predict" else torch.empty(0, dtype=torch.long)
        return CollatedBatch(images, labels, bad_paths, len(samples), self.stage)


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


def _is_visible_image(path: str, top: str) -> bool:
    parts = Path(os.path.relpath(path, top)).parts
    return path.lower().endswith(IMAGE_EXTENSIONS) and not any(part.startswith(".") for part in parts)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _scan_split(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
    top = str(split_dir)
    samples = make_dataset(top, class_to_idx, is_valid_file=lambda p: _is_visible_image(p, top), allow_empty=True)
    return [path for path, _ in samples], [label for _, label in samples]


class ImageFolderDataModule(L.LightningDataModule):
    """Image classification data from class folders, preprocessed the way the backbone expects.

    The layout is `root/train/<class>/<image>`, `root/val/<class>/<image>` and optionally `root/test/<class>/<image>`;
    class indices follow the sorted folder names of `train/`. Without `val/`, a stratified split of `train/` is used.
    Unreadable images are dropped and reported per stage by `report_bad_files` (or raise, with `bad_files="fail"`).
    Batches are `(images, targets)`, for predict `(images, paths)`.

    Args:
        root: dataset folder holding `train/`, and `val/` and `test/` where present. None is allowed only for
            `predict` (the class names then come from the checkpoint).
        val_fraction: share of each class of `train/` held out for validation when there is no `val/`.
        seed: seed of that split and of the training shuffle and augmentation (per epoch and sample, so a resumed
            run trains on exactly the batches an uninterrupted one would).
        batch_size: images per batch.
        num_workers: loader worker processes; 0 loads in the main process.
        pin_memory: pin batches in page-locked memory; only takes effect when CUDA is available.
        persistent_workers: keep workers alive between epochs; only takes effect when `num_workers` > 0.
        predict_dir: folder of images (searched recursively) or a single image for `predict`.
        input_size: side of the square network input; None takes it from the backbone's data config.
        mean: per-channel normalisation mean; None takes it from the backbone's data config.
        std: per-channel normalisation std; None takes it from the backbone's data config.
        interpolation: resize interpolation, e.g. "bilinear" or "bicubic"; None takes it from the data config.
        crop_pct: eval center-crop fraction; None takes it from the backbone's data config.
        hflip: probability of a horizontal flip in training.
        scale: area range of the training random-resized crop, as fractions of the image.
        ratio: aspect-ratio range of the training random-resized crop.
        color_jitter: strength of training brightness / contrast / saturation jitter; None turns it off.
        auto_augment: timm auto-augment policy for training, e.g. "rand-m9-mstd0.5"; None turns it off.
        re_prob: probability of random erasing in training.
        bad_files: "skip" drops unreadable images and reports them, "fail" raises on the first one.
        max_bad_fraction: largest share of skipped images per stage and report before `report_bad_files` raises.
        model_name: timm model whose data config is used when no model with a `data_config` is attached.
    """

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_dir: str | None = None,
        input_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        bad_files: str = "skip",
        max_bad_fraction: float = 0.05,
        model_name: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_arguments(self.hparams)

        self.root = Path(root) if root is not None else None
        self.data_config: dict[str, Any] | None = None
        self.train_dataset: ImageFileDataset | None = None
        self.val_dataset: ImageFileDataset | None = None
        self.test_dataset: ImageFileDataset | None = None
        self.predict_dataset: ImageFileDataset | None = None
        self._bad_paths: dict[str, list[str]] = defaultdict(list)
        self._seen: dict[str, int] = defaultdict(int)
        self._restored_steps = 0

        self._class_names: list[str] | None = None
        self._split_samples: dict[str, tuple[list[str], list[int]] | None] = {"val": None, "test": None}
        if self.root is None:
            return
        train_dir = self.root / "train"
        if not self.root.is_dir():
            raise FileNotFoundError(f"Dataset folder {self.root} does not exist; set root to a folder holding train/.")
        if not train_dir.is_dir():
            raise FileNotFoundError(f"{train_dir} does not exist; the layout is {self.root}/train/<class>/<image>.")
        self._class_names = _class_folders(train_dir)
        self._class_to_idx = {name: index for index, name in enumerate(self._class_names)}
        self._train_paths, self._train_labels = _scan_split(train_dir, self._class_to_idx)
        if not self._train_paths:
            raise FileNotFoundError(
                f"No images in {train_dir}; the layout is {train_dir}/<class>/<image> with an extension among "
                f"{' '.join(IMAGE_EXTENSIONS)}."
            )
        if len(self._class_names) < 2:
            raise ValueError(
                f"{train_dir} has {len(self._class_names)} class folder ({', '.join(self._class_names)}); "
                "a classifier needs at least two."
            )
        found = set(self._train_labels)
        for index, name in enumerate(self._class_names):
            if index not in found:
                warnings.warn(f"Class folder {train_dir / name} has no images; the class is kept.", stacklevel=2)

        # Scanned now so that a class missing from train/ fails before any training.
        self._split_samples = {"val": self._scan_labelled("val"), "test": self._scan_labelled("test")}

    @property
    def class_names(self) -> list[str] | None:
        """Class folder names of `train/`, in class-index order; None without `root`."""
        return list(self._class_names) if self._class_names is not None else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes, empty class folders included; None without `root`."""
        return len(self._class_names) if self._class_names is not None else None

    def _scan_labelled(self, split: str) -> tuple[list[str], list[int]] | None:
        split_dir = self.root / split
        if not split_dir.is_dir():
            return None
        unknown = [name for name in _class_folders(split_dir) if name not in self._class_to_idx]
        if unknown:
            raise ValueError(
                f"{split_dir} has class folder '{unknown[0]}' that {self.root / 'train'} lacks; "
                f"add training images for it or remove {split_dir / unknown[0]}."
            )
        paths, labels = _scan_split(split_dir, self._class_to_idx)
        if not paths:
            raise FileNotFoundError(f"No images in {split_dir}; add {split_dir}/<class>/<image> or remove the folder.")
        return paths, labels

    def resolve_data_config(self) -> dict[str, Any]:
        """Resolve the preprocessing config and store it as `data_config`.

        The base is the attached model's `data_config`, else the pretrained config of `model_name`, else timm's
        defaults; the non-None overrides among `input_size`, `mean`, `std`, `interpolation`, `crop_pct` win.

        Returns:
            A dict like timm's `resolve_data_config`: input_size (3, H, W), interpolation, mean, std, crop_pct,
            crop_mode.
        """
        hp = self.hparams
        model = self.trainer.lightning_module if self.trainer is not None else None
        base = getattr(model, "data_config", None)
        if base is not None:
            base = dict(base)
        elif hp.model_name is not None:
            pretrained_cfg = timm.get_pretrained_cfg(hp.model_name)
            base = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
        else:
            base = {}
        overrides = {
            "img_size": hp.input_size,
            "mean": hp.mean,
            "std": hp.std,
            "interpolation": hp.interpolation,
            "crop_pct": hp.crop_pct,
        }
        args = {"in_chans": 3, **{key: value for key, value in overrides.items() if value is not None}}
        self.data_config = resolve_data_config(args=args, pretrained_cfg=base)
        return self.data_config

    def train_transform(self, data_config: Mapping[str, Any] | None = None) -> Callable[[Image.Image], Tensor]:
        """The training transform: timm's random-resized crop and augmentations, then normalisation.

        Args:
            data_config: preprocessing config; None uses `data_config`, resolving it first if needed.
        """
        cfg = data_config or self.data_config or self.resolve_data_config()
        hp = self.hparams
        return create_transform(
            input_size=cfg["input_size"],
            is_training=True,
            scale=tuple(hp.scale),
            ratio=tuple(hp.ratio),
            hflip=hp.hflip,
            color_jitter=hp.color_jitter,
            auto_augment=hp.auto_augment,
            re_prob=hp.re_prob,
            interpolation=cfg["interpolation"],
            mean=cfg["mean"],
            std=cfg["std"],
        )

    def eval_transform(self, data_config: Mapping[str, Any] | None = None) -> Callable[[Image.Image], Tensor]:
        """The evaluation transform: resize, center crop by `crop_pct`, normalise.

        Args:
            data_config: preprocessing config; None uses `data_config`, resolving it first if needed.
        """
        cfg = data_config or self.data_config or self.resolve_data_config()
        return create_transform(
            input_size=cfg["input_size"],
            is_training=False,
            interpolation=cfg["interpolation"],
            mean=cfg["mean"],
            std=cfg["std"],
            crop_pct=cfg["crop_pct"],
            crop_mode=cfg.get("crop_mode"),
        )

    def setup(self, stage: str | None = None) -> None:
        """Resolve the data config and build the datasets `stage` needs ("fit", "validate", "test", "predict").

        Raises:
            FileNotFoundError: "test" without `root/test/`, or a `predict_dir` without images.
            ValueError: "predict" without `predict_dir`.
        """
        self.resolve_data_config()
        bad_files = self.hparams.bad_files
        if self.root is None and stage != "predict":
            raise ValueError(f"data.root is required to {stage or 'set up'}: a folder holding train/<class>/<image>.")
        if stage in ("fit", "validate", None):
            train_paths, train_labels, val_paths, val_labels = self._train_val_samples()
            if stage != "validate":
                self.train_dataset = ImageFileDataset(train_paths, train_labels, self.train_transform(), bad_files)
            self.val_dataset = ImageFileDataset(val_paths, val_labels, self.eval_transform(), bad_files)
        if stage == "test" or (stage is None and self._split_samples["test"] is not None):
            if self._split_samples["test"] is None:
                raise FileNotFoundError(
                    f"Testing needs {self.root / 'test'}/<class>/<image>; create it or use validate instead."
                )
            self.test_dataset = ImageFileDataset(*self._split_samples["test"], self.eval_transform(), bad_files)
        if stage == "predict":
            self.predict_dataset = ImageFileDataset(self._predict_paths(), None, self.eval_transform(), bad_files)

    def _train_val_samples(self) -> tuple[list[str], list[int], list[str], list[int]]:
        if self._split_samples["val"] is not None:
            return self._train_paths, self._train_labels, *self._split_samples["val"]
        train, val = stratified_split(self._train_labels, self.hparams.val_fraction, self.hparams.seed)
        if not val:
            raise ValueError(
                f"No class of {self.root / 'train'} has two images, so none can be held out for validation; "
                f"add images or a {self.root / 'val'} folder."
            )
        paths, labels = self._train_paths, self._train_labels
        return [paths[i] for i in train], [labels[i] for i in train], [paths[i] for i in val], [labels[i] for i in val]

    def _predict_paths(self) -> list[str]:
        if self.hparams.predict_dir is None:
            raise ValueError("Predicting needs data.predict_dir, a folder of images.")
        folder = Path(self.hparams.predict_dir)
        if folder.is_file():
            return [str(folder)]
        if not folder.is_dir():
            raise FileNotFoundError(f"predict_dir {folder} does not exist.")
        paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and _is_visible_image(str(p), str(folder)))
        if not paths:
            raise FileNotFoundError(f"No images in predict_dir {folder} (extensions {' '.join(IMAGE_EXTENSIONS)}).")
        return paths

    def _loader(self, dataset: ImageFileDataset | None, stage: str, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            setup_stage = {"train": "fit", "val": "validate"}.get(stage, stage)
            raise RuntimeError(f"Call setup('{setup_stage}') before asking for the {stage} dataloader.")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochSampler(dataset, self.hparams.seed, self._steps_done) if shuffle else None,
            drop_last=False,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            collate_fn=SkipBadCollate(stage, self.data_config["input_size"]),
        )

    def _steps_done(self) -> int:
        # Lightning builds the first training iterator before it restores the step count of a resumed run, so the
        # count saved with the checkpoint (load_state_dict) stands in until training moves past it.
        steps = self.trainer.global_step if self.trainer is not None else 0
        return max(steps, self._restored_steps)

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the optimizer steps done, the key of the next epoch's shuffle."""
        return {"steps_done": self._steps_done()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_steps = int(state_dict.get("steps_done", 0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of `(images, targets)` (after `on_before_batch_transfer`)."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of `(images, targets)` (after `on_before_batch_transfer`)."""
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        """Test batches of `(images, targets)` (after `on_before_batch_transfer`)."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """Predict batches of `(images, paths)` (after `on_before_batch_transfer`)."""
        return self._loader(self.predict_dataset, "predict")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the batch's unreadable files and sample count, and hand on a plain `(images, targets_or_paths)`.

        Runs in the main process, so the record is complete with worker processes too. A batch whose every file
        was unreadable arrives as images of shape (0, 3, H, W).
        """
        if not isinstance(batch, CollatedBatch):
            return batch
        self._seen[batch.stage] += batch.num_samples
        self._bad_paths[batch.stage].extend(batch.bad_paths)
        return batch.images, batch.labels

    def report_bad_files(self, stage: str) -> None:
        """Warn about the files of `stage` skipped since the last report, then start counting afresh.

        Args:
            stage: "train", "val", "test" or "predict".

        Raises:
            ValueError: an unknown stage, or more than `max_bad_fraction` of the samples were skipped.
        """
        if stage not in STAGES:
            raise ValueError(f"Unknown stage '{stage}'; use one of {', '.join(STAGES)}.")
        bad, seen = self._bad_paths.pop(stage, []), self._seen.pop(stage, 0)
        if not bad:
            return
        fraction = len(bad) / max(seen, len(bad))
        shown = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        summary = f"Skipped {len(bad)} of {seen} {stage} images ({fraction:.1%}) that could not be read:\n  {shown}"
        log.warning(summary)
        limit = self.hparams.max_bad_fraction
        if fraction > limit:
            raise ValueError(f"{summary}\nThat is more than max_bad_fraction={limit}; fix or delete these files.")


def _check_arguments(hp: Mapping[str, Any]) -> None:
    if hp["bad_files"] not in ("skip", "fail"):
        raise ValueError(f"bad_files must be 'skip' or 'fail', not {hp['bad_files']!r}.")
    if not 0.0 <= hp["max_bad_fraction"] <= 1.0:
        raise ValueError(f"max_bad_fraction must lie in [0, 1], not {hp['max_bad_fraction']}.")
    if not 0.0 < hp["val_fraction"] < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, not {hp['val_fraction']}.")
    if hp["batch_size"] < 1 or hp["num_workers"] < 0:
        raise ValueError(f"Need batch_size >= 1 and num_workers >= 0, got {hp['batch_size']}, {hp['num_workers']}.")
    for name in ("mean", "std"):
        if hp[name] is not None and len(hp[name]) != 3:
            raise ValueError(f"{name} needs three values (R, G, B), got {tuple(hp[name])}.")
    if hp["input_size"] is not None and hp["input_size"] < 1:
        raise ValueError(f"input_size must be a positive number of pixels, not {hp['input_size']}.")
    if hp["model_name"] is not None:
        if not timm.is_model(hp["model_name"]):
            raise ValueError(f"Unknown timm model '{hp['model_name']}'; see timm.list_models().")
        try:
            timm.get_pretrained_cfg(hp["model_name"])
        except RuntimeError as err:  # a pretrained tag the architecture does not have
            raise ValueError(f"model_name '{hp['model_name']}': {err}") from err
