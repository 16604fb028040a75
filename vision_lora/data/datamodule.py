"""ImageFolderDataModule: batches from an image folder or an optimized (LitData) dataset, preprocessed the way the
model expects; and the callback that reports unreadable images."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import timm
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .. import preprocess as preprocessing
from ..errors import VisionLoRAError
from ..preemption import leave_sigterm_to_main
from ..recipe import AUGMENTS
from .decode import ImagePipeline
from .folder import image_files
from .hf import HFSource
from .labels import LabelFileSource
from .samples import (
    BadSample,
    BalancedEpochSampler,
    CollatedBatch,
    EpochSampler,
    ImageFileDataset,
    SkipBadCollate,
    class_balanced_weights,
)
from .sources import class_counts, open_source, train_counts, train_counts_of
from .streaming import streaming_dataset

__all__ = ["ImageFolderDataModule", "STAGES", "train_counts", "train_counts_of"]

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test", "predict")


class ImageFolderDataModule(L.LightningDataModule):
    """Image classification data from class folders or an optimized dataset, preprocessed the way the model expects.

    `root` is either an image folder (`root/train/<class>/<image>`, `root/val/...`, optionally `root/test/...`; class
    indices follow the sorted folder names of `train/`; without `val/`, a stratified split of `train/`) or an
    optimized dataset written by `vision-lora optimize` (a folder or a bucket URI such as `s3://bucket/pets`,
    recognised by its `vision_lora_dataset.json`), streamed with LitData. Preprocessing (input size, mean, std,
    interpolation, crop) comes from the model the Trainer runs, read once in `setup`; standalone, from the timm
    config of `model_name`. Batches are `(images, targets)`, for predict `(images, paths)`; `batch_keys` names the
    samples of the batch being processed (paths, or keys of the optimized dataset). Unreadable images are dropped
    and reported by the `BadFileReport` callback (or raise, with `bad_files="fail"`).

    Args:
        root: image folder or optimized dataset (local or remote URI). None is allowed only for `predict` (the class
            names then come from the checkpoint).
        val_fraction: share of each class of `train/` held out for validation when there is no `val/`.
        seed: seed of that split and of the training shuffle and augmentation (per epoch and sample, so a resumed
            run trains on exactly the batches an uninterrupted one would).
        batch_size: images per batch (per process under DDP).
        num_workers: loader worker processes; 0 loads in the main process.
        pin_memory: pin batches in page-locked memory; only takes effect when CUDA is available.
        persistent_workers: keep image-folder workers alive between epochs; only takes effect when `num_workers` > 0.
        predict_dir: folder of images (searched recursively) or a single image for `predict`.
        augment: training augmentation: "none" (the evaluation resize and centre crop), "light" (that plus the
            horizontal flip `hflip`), "standard" (timm's random-resized crop by `scale` and `ratio`, `hflip`,
            `color_jitter`, `auto_augment`, `re_prob`), or "auto": `vision-lora fit --recipe auto` screens them on
            the run's val split and records the winner; elsewhere "auto" is "light".
        hflip: probability of a horizontal flip in training ("light" and "standard").
        scale: area range of the training random-resized crop, as fractions of the image.
        ratio: aspect-ratio range of the training random-resized crop.
        color_jitter: strength of training brightness / contrast / saturation jitter; None turns it off.
        auto_augment: timm auto-augment policy for training, e.g. "rand-m9-mstd0.5"; None turns it off.
        re_prob: probability of random erasing in training.
        fast_decode: decode JPEGs at 1/2, 1/4 or 1/8 scale where the crop or resize never needs more pixels.
        bad_files: "skip" drops unreadable images and reports them, "fail" raises on the first one.
        max_bad_fraction: largest share of skipped images per stage and report before `report_bad_files` raises.
        model_name: timm model whose preprocessing config is used when no model is attached (standalone use).
        preprocess: overrides of that config when no model is attached (keys of timm's data config: input_size,
            mean, std, interpolation, crop_pct, crop_mode). With a model attached, set them on the model.
        labels: a label file (CSV `path,label[,split]` or JSONL `{"path": ..., "label": ..., "split": ...}`) whose
            paths are relative to `root` (default: the file's folder); see docs/label-files.md.
        task: "multiclass" (one class per image), "multilabel" (a set of classes per image, sigmoid outputs), or
            "auto": multilabel when a JSONL label is a list (printed) or the optimized dataset is multi-label.
            Linked into the model.
        classes: the class list and order of a label file (default: the sorted union of its labels).
        label_sep: separator of several classes in a CSV label cell (multilabel).
        allow_outside_root: accept label-file paths that leave `root` (absolute, `../`, symlinks out).
        hf: a Hugging Face dataset instead of `root`: a `save_to_disk` folder or a local `load_dataset` spec, read
            offline (splits train / validation / test; needs the [hf] extra; docs/huggingface.md).
        hf_image_column: its image column.
        hf_label_column: its label column: a ClassLabel, a list of ClassLabel (multi-label) or class-name strings.
        sampler: training sampling: "shuffle" (each image once per epoch) or "balanced" (each class drawn equally
            often, with replacement; single-label image folders and label files). None: left to `--recipe auto`,
            which screens it on imbalanced data (docs/imbalance.md); else "shuffle".
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
        augment: str = "auto",
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        fast_decode: bool = True,
        bad_files: str = "skip",
        max_bad_fraction: float = 0.05,
        model_name: str | None = None,
        preprocess: dict | None = None,
        labels: str | None = None,
        task: Literal["auto", "multiclass", "multilabel"] = "auto",
        classes: list[str] | None = None,
        label_sep: str = " ",
        allow_outside_root: bool = False,
        sampler: Literal["shuffle", "balanced"] | None = None,
        hf: str | None = None,
        hf_image_column: str = "image",
        hf_label_column: str = "label",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_arguments(self.hparams)
        self.root = root
        self.data_config: dict[str, Any] | None = None
        self.datasets: dict[str, Dataset] = {}
        self.batch_keys: list[str] = []
        self._bad: dict[str, list[BadSample]] = defaultdict(list)
        self._seen: dict[str, int] = defaultdict(int)
        self._restored: dict[str, Any] = {}
        self._epoch_key: int | None = None  # shuffle key of the current image-folder epoch
        self._batches_done = 0  # training batches of the current epoch handed to the model
        self._train_loader: DataLoader | None = None
        self.folder, self.info, self._class_names, self._task = open_source(self.hparams)
        if isinstance(self.folder, LabelFileSource):
            self.root = str(self.folder.root)
        # Recorded resolved: Lightning refuses a run whose model and data record the same key with different values
        # (and under LightningCLI `save_hyperparameters` records the given arguments, so both copies are set here).
        self.hparams.task = self._hparams_initial["task"] = self._task
        if sampler == "balanced" and self._task == "multilabel":
            raise VisionLoRAError("data.sampler balanced is for single-label data; use model.class_weights auto.")
        if sampler == "balanced" and self.info is not None:
            raise VisionLoRAError("data.sampler balanced needs an image folder or a label file, not streamed data.")

    @property
    def class_names(self) -> list[str] | None:
        """Class names in class-index order; None without `root`."""
        return list(self._class_names) if self._class_names is not None else None

    @property
    def task(self) -> str | None:
        """ "multiclass" or "multilabel"; None without `root` (predict: the checkpoint's)."""
        return self._task

    def train_class_counts(self) -> list[int]:
        """Training images per class (positives per class for multilabel), for class weights.

        Raises:
            VisionLoRAError: the counts are not known here (an optimized dataset, or no data).
        """
        if self.folder is None:
            raise VisionLoRAError("model.class_weights auto needs an image folder or a label file as data.")
        return class_counts(self.folder, len(self._class_names))

    @property
    def num_classes(self) -> int | None:
        """Number of classes, empty class folders included; None without `root`."""
        return len(self._class_names) if self._class_names is not None else None

    @property
    def train_dataset(self) -> Dataset | None:
        return self.datasets.get("train")

    @property
    def val_dataset(self) -> Dataset | None:
        return self.datasets.get("val")

    @property
    def test_dataset(self) -> Dataset | None:
        return self.datasets.get("test")

    @property
    def predict_dataset(self) -> Dataset | None:
        return self.datasets.get("predict")

    @property
    def source(self) -> str:
        """ "folder", "optimized", or "none" (predict only)."""
        if isinstance(self.folder, (LabelFileSource, HFSource)):
            return "labels" if isinstance(self.folder, LabelFileSource) else "hf"
        return "folder" if self.folder is not None else "optimized" if self.info is not None else "none"

    # -- preprocessing -------------------------------------------------------------------------------------------

    def resolve_data_config(self) -> dict[str, Any]:
        """The preprocessing config, stored as `data_config`: the attached model's `data_config`; standalone, the
        timm config of `model_name` (else timm's defaults) with the `preprocess` overrides.

        Raises:
            VisionLoRAError: `preprocess` overrides are set while a model that owns the preprocessing is attached.
        """
        hp = self.hparams
        model = self.trainer.lightning_module if self.trainer is not None else None
        owned = getattr(model, "data_config", None)
        if owned is not None:
            if hp.preprocess:
                raise VisionLoRAError(
                    "data.preprocess is set, but the model owns the preprocessing; set model.input_size, "
                    "model.crop_pct, ... instead and remove data.preprocess."
                )
            self.data_config = dict(owned)
            return self.data_config
        base = {}
        if hp.model_name is not None:
            pretrained_cfg = timm.get_pretrained_cfg(hp.model_name)
            base = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
        self.data_config = preprocessing.resolve_data_config(base, hp.preprocess)
        return self.data_config

    def train_transform(self, data_config: Mapping[str, Any] | None = None) -> Callable[[Image.Image], Tensor]:
        """The training transform on RGB images, by `augment`: the eval transform, plus a flip ("light"), or timm's
        random-resized crop and augmentations ("standard"); then normalisation."""
        cfg = data_config or self.data_config or self.resolve_data_config()
        hp = self.hparams
        augment = self.augment
        if augment in ("none", "light"):
            steps = list(preprocessing.eval_transform(cfg).transforms)
            if augment == "light" and hp.hflip > 0:
                steps.insert(len(steps) - 2, T.RandomHorizontalFlip(hp.hflip))  # before to-tensor + normalise
            return T.Compose(steps)
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

    @property
    def augment(self) -> str:
        """The augmentation that runs: `augment`, with "auto" (left to `vision-lora fit`'s recipe screen) as the
        plain loop's "light"."""
        return "light" if self.hparams.augment == "auto" else self.hparams.augment

    def use_augment(self, augment: str) -> None:
        """Train with `augment` from the next training dataloader on (the recipe screen's candidates)."""
        if augment not in AUGMENTS:
            raise VisionLoRAError(f"augment must be one of {', '.join(AUGMENTS)}, not {augment!r}.")
        self.hparams.augment = augment
        if "train" in self.datasets:
            self.datasets["train"] = self._dataset("train")

    def use_sampler(self, sampler: str) -> None:
        """Train with `sampler` ("shuffle" or "balanced") from the next training dataloader on (the recipe screen's
        imbalance candidates, see `vision_lora.recipe`)."""
        if sampler not in ("shuffle", "balanced"):
            raise VisionLoRAError(f"sampler must be 'shuffle' or 'balanced', not {sampler!r}.")
        if sampler == "balanced" and (self._task == "multilabel" or self.folder is None):
            raise VisionLoRAError("data.sampler balanced needs single-label data from an image folder or label file.")
        self.hparams.sampler = sampler

    def eval_transform(self, data_config: Mapping[str, Any] | None = None) -> Callable[[Image.Image], Tensor]:
        """The evaluation transform on RGB images (`vision_lora.preprocess.eval_transform`, which export verification
        and `vision-lora serve` use too): resize, center crop by `crop_pct`, normalise."""
        return preprocessing.eval_transform(data_config or self.data_config or self.resolve_data_config())

    # -- datasets ------------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the preprocessing config and build the datasets `stage` needs ("fit", "validate", "test",
        "predict"). Streaming datasets are built here, after Lightning has set up the process group.

        Raises:
            FileNotFoundError: "test" without a test split, or a `predict_dir` without images.
            VisionLoRAError: "predict" without `predict_dir`, or no `root` for the other stages.
        """
        self.resolve_data_config()
        if self.root is None and self.folder is None and stage != "predict":
            raise VisionLoRAError(
                f"data.root is required to {stage or 'set up'}: a folder holding train/<class>/<image>, or an "
                "optimized dataset."
            )
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        wanted = splits.get(stage, ["train", "val"] + (["test"] if self.has_split("test") else []))
        for split in wanted:
            self.datasets[split] = self._dataset(split)

    def has_split(self, split: str) -> bool:
        """Whether the data has `split`: a folder of that name, or samples of it in an optimized dataset."""
        if self.folder is not None:
            return split in self.folder.splits()
        return self.info is not None and self.info["counts"].get(split, 0) > 0

    def _dataset(self, split: str) -> Dataset:
        hp = self.hparams
        transform = self.train_transform() if split == "train" else self.eval_transform()
        pipeline = ImagePipeline(transform, reduce=hp.fast_decode)
        if split == "predict":
            if hp.predict_dir is None:
                raise VisionLoRAError("Predicting needs data.predict_dir, a folder of images.")
            return ImageFileDataset(image_files(hp.predict_dir), None, pipeline, hp.bad_files)
        if isinstance(self.folder, HFSource):
            return self.folder.dataset(split, pipeline, hp.bad_files)
        if self.folder is not None:
            return ImageFileDataset(*self.folder.samples(split), pipeline, hp.bad_files)
        if not self.has_split(split):
            raise FileNotFoundError(f"The optimized dataset {self.root} has no {split} split.")
        return streaming_dataset(
            f"{str(self.root).rstrip('/')}/{split}",
            pipeline,
            shuffle=split == "train",
            seed=hp.seed,
            bad_files=hp.bad_files,
            drop_last=split == "train" and self._ranks()[0] > 1,  # equal steps on every rank; one rank keeps all
            num_classes=self.num_classes if self._task == "multilabel" else None,
        )

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            setup_stage = {"train": "fit", "val": "validate"}.get(split, split)
            raise RuntimeError(f"Call setup('{setup_stage}') before asking for the {split} dataloader.")
        dataset, hp = self.datasets[split], self.hparams
        common = dict(
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            collate_fn=SkipBadCollate(split, self.data_config["input_size"]),
            worker_init_fn=leave_sigterm_to_main if hp.num_workers > 0 else None,
        )
        if self.info is not None and split != "predict":
            from litdata import StreamingDataLoader

            loader = StreamingDataLoader(dataset, **common)
            if split == "train" and "train_loader" in self._restored:
                loader.load_state_dict(self._restored.pop("train_loader"))
            return loader
        world, rank = self._ranks()
        if split == "train" and hp.sampler == "balanced":
            weights = class_balanced_weights(self.folder.samples("train")[1])
            sampler = BalancedEpochSampler(dataset, weights, hp.seed, self._epoch_start, num_replicas=world, rank=rank)
        elif split == "train":
            sampler = EpochSampler(dataset, hp.seed, self._epoch_start, num_replicas=world, rank=rank)
        elif world > 1:  # every sample exactly once across ranks, where Lightning's sampler would pad
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        else:
            sampler = None
        persistent = hp.persistent_workers and hp.num_workers > 0
        return DataLoader(dataset, sampler=sampler, persistent_workers=persistent, **common)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of `(images, targets)` (after `on_before_batch_transfer`)."""
        self._train_loader = self._loader("train")
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        """Validation batches of `(images, targets)`: every sample once, also across DDP ranks."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches of `(images, targets)`: every sample once, also across DDP ranks."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Predict batches of `(images, paths)`."""
        return self._loader("predict")

    # -- resuming ------------------------------------------------------------------------------------------------

    def _steps_done(self) -> int:
        # Lightning builds the first training iterator before it restores the step count of a resumed run, so the
        # count saved with the checkpoint (load_state_dict) stands in until training moves past it.
        steps = self.trainer.global_step if self.trainer is not None else 0
        return max(steps, self._restored.get("steps_done", 0))

    def _epoch_start(self) -> tuple[int, int]:
        """(shuffle key, samples to skip) of the image-folder epoch that starts now: a new epoch is keyed by the
        steps done; a run resumed mid-epoch continues its epoch's shuffle after the batches it already trained on."""
        key, done = self._restored.pop("epoch_key", None), self._restored.pop("batches_done", 0)
        if key is None or not done:
            key, done = self._steps_done(), 0
        self._epoch_key, self._batches_done = key, done
        return key, done * self.hparams.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the optimizer steps done (the key of the next image-folder epoch's
        shuffle), the current epoch's key and batches done, and, for a streaming dataset, the loader's position in
        its epoch."""
        state: dict[str, Any] = {"steps_done": self._steps_done()}
        if self._epoch_key is not None and self._train_loader is not None:
            full = self._batches_done >= len(self._train_loader)  # an epoch-end checkpoint: the next epoch is new
            state.update(epoch_key=self._epoch_key, batches_done=0 if full else self._batches_done)
        loader = self._train_loader
        if loader is not None and hasattr(loader, "state_dict"):
            # Kept here rather than left to Lightning, which restores a loader's state only if the loader was not
            # built before the restore, and `estimated_stepping_batches` builds it early.
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {"steps_done": int(state_dict.get("steps_done", 0))}
        for key in ("train_loader", "epoch_key", "batches_done"):
            if key in state_dict:
                self._restored[key] = state_dict[key]

    # -- bad files -----------------------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the batch's keys, unreadable samples and sample count, and hand on `(images, targets_or_paths)`.

        Runs in the main process, so the record is complete with worker processes too. A batch whose every file
        was unreadable arrives as images of shape (0, 3, H, W).
        """
        if not isinstance(batch, CollatedBatch):
            return batch
        self.batch_keys = batch.keys
        if batch.stage == "train":
            self._batches_done += 1
        self._seen[batch.stage] += batch.num_samples
        self._bad[batch.stage].extend(batch.bad)
        return batch.images, batch.labels

    def report_bad_files(self, stage: str) -> None:
        """Warn about the samples of `stage` skipped since the last report, then start counting afresh.

        Raises:
            VisionLoRAError: an unknown stage, or more than `max_bad_fraction` of the samples were skipped.
        """
        if stage not in STAGES:
            raise VisionLoRAError(f"Unknown stage '{stage}'; use one of {', '.join(STAGES)}.")
        bad, seen = self._bad.pop(stage, []), self._seen.pop(stage, 0)
        if not bad:
            return
        fraction = len(bad) / max(seen, len(bad))
        shown = "\n  ".join(f"{b.key} ({b.reason})" if b.reason else b.key for b in bad[:20])
        shown += "\n  ..." if len(bad) > 20 else ""
        summary = f"Skipped {len(bad)} of {seen} {stage} images ({fraction:.1%}) that could not be read:\n  {shown}"
        log.warning(summary)
        limit = self.hparams.max_bad_fraction
        if fraction > limit:
            raise VisionLoRAError(f"{summary}\nThat is more than max_bad_fraction={limit}; fix or delete these files.")


def _check_arguments(hp: Mapping[str, Any]) -> None:
    if hp["bad_files"] not in ("skip", "fail"):
        raise VisionLoRAError(f"bad_files must be 'skip' or 'fail', not {hp['bad_files']!r}.")
    if not 0.0 <= hp["max_bad_fraction"] <= 1.0:
        raise VisionLoRAError(f"max_bad_fraction must lie in [0, 1], not {hp['max_bad_fraction']}.")
    if not 0.0 < hp["val_fraction"] < 1.0:
        raise VisionLoRAError(f"val_fraction must lie strictly between 0 and 1, not {hp['val_fraction']}.")
    if hp["augment"] not in AUGMENTS:
        raise VisionLoRAError(f"augment must be one of {', '.join(AUGMENTS)}, not {hp['augment']!r}.")
    if hp["batch_size"] < 1 or hp["num_workers"] < 0:
        raise VisionLoRAError(
            f"Need batch_size >= 1 and num_workers >= 0, got {hp['batch_size']}, {hp['num_workers']}."
        )
    if hp["model_name"] is not None:
        if not timm.is_model(hp["model_name"]):
            raise VisionLoRAError(f"Unknown timm model '{hp['model_name']}'; see timm.list_models().")
        try:
            timm.get_pretrained_cfg(hp["model_name"])
        except RuntimeError as err:  # a pretrained tag the architecture does not have
            raise VisionLoRAError(f"model_name '{hp['model_name']}': {err}") from err
