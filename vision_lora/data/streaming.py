"""Optimized datasets on LitData: `optimize_folder` writes each split of an image folder as LitData chunks of
pre-resized image bytes + labels, and `StreamingImageDataset` streams them back, from disk or a bucket."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .._io import atomic_write
from ..errors import VisionLoRAError, require
from .decode import _decode, _orientation, _oriented_size, _reduction, open_image
from .folder import FolderSource
from .samples import display_name, load_sample

if TYPE_CHECKING:
    from .hf import HFSource
    from .labels import LabelFileSource

__all__ = [
    "DATASET_INFO",
    "OptimizeReport",
    "is_optimized",
    "is_remote",
    "optimize_folder",
    "read_info",
    "streaming_dataset",
]

DATASET_INFO = "vision_lora_dataset.json"  # written last: its presence marks a complete optimized dataset
_PARTIAL = ".vision_lora_optimizing"  # written first: a folder holding it is ours, half-written
_FORMAT = "vision_lora.optimized/1"
_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")  # small files in these formats are stored byte for byte
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")


def is_remote(uri: str) -> bool:
    """Whether `uri` names a bucket (or a `local:` URI, which LitData treats like one)."""
    return str(uri).startswith(REMOTE_PREFIXES)


def is_optimized(root: str) -> bool:
    """Whether `root` names an optimized dataset (complete or not) rather than an image folder."""
    return is_remote(root) or (Path(root) / DATASET_INFO).exists() or (Path(root) / _PARTIAL).exists()


# ---------------------------------------------------------------------------------------------------------- writing


def _stored_label(label: int | tuple[float, ...]) -> int | str:
    """A class index as it is; a multi-hot target as the JSON list of its classes (one field type for any count)."""
    return int(label) if isinstance(label, int) else json.dumps([i for i, v in enumerate(label) if v])


def _encode(item: tuple[str | bytes, int | tuple, str], max_side: int, quality: int, bad_dir: str):
    """LitData's per-item function: one sample dict, or nothing (and a line in `bad_dir`) for an unreadable file.

    A generator, so that a bad file is skipped instead of stopping the whole optimize run.
    """
    path, label, key = item
    try:
        raw = path if isinstance(path, bytes) else Path(path).read_bytes()
        with open_image(raw) as image:
            width, height = _oriented_size(image)
            upright = _orientation(image) == 1
            if image.format in _KEPT_FORMATS and max(width, height) <= max_side and upright:
                image.load()  # a truncated file fails here, as it would in training
                data = raw
            else:
                rgb = _decode(image, _reduction(max(width, height) / max_side))
                rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)  # only ever shrinks
                buffer = io.BytesIO()
                rgb.save(buffer, "JPEG", quality=quality)
                data = buffer.getvalue()
    except Exception as err:  # noqa: BLE001 - every unreadable file is reported, whatever PIL raised
        with open(Path(bad_dir) / f"{os.getpid()}.tsv", "a", encoding="utf-8") as f:
            f.write(f"{key}\t{type(err).__name__}: {err}\n".replace("\r", " "))
        return
    yield {"image": data, "label": _stored_label(label), "key": key}


def _items(source: FolderSource, split: str) -> list[tuple[str | bytes, int | tuple, str]]:
    """(file path or encoded bytes, target, key) of each sample of `split`; keys are paths relative to the source's
    folder (a Hugging Face dataset: stored file names, else `<split>[<row>]`)."""
    if hasattr(source, "encoded_items"):
        return source.encoded_items(split)
    paths, labels = source.samples(split)
    return [(p, label, display_name(os.path.relpath(p, source.root))) for p, label in zip(paths, labels, strict=True)]


def _fingerprint(source: FolderSource, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in source.splits():
        digest.update(f"[{split}]".encode())
        paths, labels = source.samples(split)
        if hasattr(source, "fingerprint"):  # a Hugging Face dataset: the library's own fingerprint of the table
            digest.update(f"{source.fingerprint(split)}\0{labels}".encode())
            continue
        for path, label in zip(paths, labels, strict=True):
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class OptimizeReport:
    """What `optimize_folder` did: the counts per split, the skipped files, the bytes written."""

    output: str
    up_to_date: bool
    counts: dict[str, int] = field(default_factory=dict)
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0

    def __str__(self) -> str:
        if self.up_to_date:
            return f"{self.output} is up to date with its source folder; nothing to do."
        counts = ", ".join(f"{split} {n:,}" for split, n in self.counts.items())
        lines = [
            f"Optimized dataset written to {self.output}: {counts} images, {self.output_bytes / 1e6:.1f} MB "
            f"({self.output_bytes / max(self.source_bytes, 1):.3f} of the source's {self.source_bytes / 1e6:.1f} MB)."
        ]
        if self.bad_files:
            lines.append(f"Skipped {len(self.bad_files)} files that could not be read:")
            lines += [f"  {key}: {reason}" for key, reason in self.bad_files[:20]]
            lines += ["  ..."] if len(self.bad_files) > 20 else []
        return "\n".join(lines)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _claim_output(output: Path) -> None:
    """Make sure `output` is ours to (re)write: missing, empty, or holding our marker files; then clear it."""
    if output.exists() and not output.is_dir():
        raise VisionLoRAError(f"--output {output} is a file; give a folder for the optimized dataset.")
    if output.is_dir() and any(output.iterdir()):
        if not ((output / DATASET_INFO).is_file() or (output / _PARTIAL).is_file()):
            raise VisionLoRAError(
                f"--output {output} is not empty and holds no vision-lora optimized dataset; refusing to write "
                "into it. Give a new or empty folder."
            )
        for child in output.iterdir():  # only what we wrote: the split folders and our markers
            if child.name in ("train", "val", "test") and child.is_dir():
                shutil.rmtree(child)
            elif child.name in (DATASET_INFO, _PARTIAL):
                child.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / _PARTIAL).write_text("optimize in progress or interrupted; rerun it\n", encoding="utf-8")


@contextlib.contextmanager
def _litdata_side_effects_undone():
    """litdata.optimize switches the process to the spawn start method and installs a SIGINT handler; undo both."""
    start_method = multiprocessing.get_start_method(allow_none=True)
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        multiprocessing.set_start_method(start_method, force=True)
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def optimize_folder(
    source: FolderSource | LabelFileSource | HFSource,
    output: str | os.PathLike,
    max_side: int = 512,
    quality: int = 90,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
) -> OptimizeReport:
    """Write every split of an image folder, label file or Hugging Face dataset as a LitData optimized dataset in
    `output` (multi-label targets as the JSON list of their classes).

    Each image is stored as encoded bytes with its longer side at most `max_side` (re-encoded as JPEG at
    `quality` where it had to shrink or rotate; kept byte for byte otherwise), with its class index and its path
    relative to the folder as key. `output/vision_lora_dataset.json`, written last, holds the class map, the counts,
    the skipped files and the source's fingerprint: a second run on an unchanged folder does nothing, a run on a
    changed folder rewrites the dataset, and an interrupted run leaves no dataset that looks complete.

    Raises:
        VisionLoRAError: `output` is not empty and not a vision-lora optimized dataset; bad settings.
    """
    optimize = require("litdata", "stream", "vision-lora optimize").optimize

    if max_side < 32 or not 1 <= quality <= 100:
        raise VisionLoRAError(f"Need max_side >= 32 and 1 <= quality <= 100, got {max_side} and {quality}.")
    output = Path(output)
    settings = {"format": _FORMAT, "max_side": max_side, "quality": quality, **source.split_settings()}
    fingerprint = _fingerprint(source, settings)
    info_path = output / DATASET_INFO
    if info_path.is_file() and not (output / _PARTIAL).exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(info_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return OptimizeReport(str(output), up_to_date=True)
    _claim_output(output)
    origin = Path(getattr(source, "root", None) or getattr(source, "spec", ""))
    report = OptimizeReport(str(output), up_to_date=False, source_bytes=_folder_bytes(origin) if origin.is_dir() else 0)
    with tempfile.TemporaryDirectory() as bad_dir, _litdata_side_effects_undone():
        for split in source.splits():
            items = _items(source, split)
            random.Random(0).shuffle(items)  # LitData shuffles within a window only: mix classes across chunks
            workers = max(1, min(num_workers or os.cpu_count() or 1, len(items)))
            with contextlib.redirect_stdout(io.StringIO()):  # LitData's promotional and status lines
                optimize(
                    fn=partial(_encode, max_side=max_side, quality=quality, bad_dir=bad_dir),
                    inputs=items,
                    output_dir=str(output / split),
                    chunk_bytes=chunk_bytes,
                    num_workers=workers,
                    reorder_files=False,
                    verbose=True,
                    # fork: workers start in milliseconds instead of re-importing torch (the parent has run no
                    # torch op yet); spawn where fork does not exist.
                    start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn",
                )
            report.counts[split] = _count(output / split)
        for tsv in sorted(Path(bad_dir).glob("*.tsv")):
            for line in tsv.read_text(encoding="utf-8").splitlines():
                key, _, reason = line.partition("\t")
                report.bad_files.append((key, reason))
    report.bad_files.sort()
    report.output_bytes = _folder_bytes(output)
    info = {
        **settings,
        "fingerprint": fingerprint,
        "class_names": source.class_names,
        "task": getattr(source, "task", "multiclass"),
        "counts": report.counts,
        "source": str(origin.resolve()),
        "bad_files": [list(bad) for bad in report.bad_files],
    }
    text = json.dumps(info, indent=2, ensure_ascii=False)
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    (output / _PARTIAL).unlink()
    return report


def _count(split_dir: Path) -> int:
    index = split_dir / "index.json"
    if not index.is_file():
        return 0
    return sum(chunk["chunk_size"] for chunk in json.loads(index.read_text(encoding="utf-8"))["chunks"])


# ---------------------------------------------------------------------------------------------------------- reading


def _check_credentials(uri: str) -> None:
    if not uri.startswith("s3://"):
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise VisionLoRAError(
            f"No AWS credentials found to read {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE, or an instance role), and AWS_ENDPOINT_URL for an S3-compatible store."
        )


def _check_split(split_dir: Path) -> None:
    """Every chunk the split's index lists is there, at its full size."""
    index = split_dir / "index.json"
    again = "run `vision-lora optimize` again to rewrite the dataset"
    try:
        chunks = json.loads(index.read_text(encoding="utf-8"))["chunks"]
    except (OSError, ValueError, KeyError) as err:
        raise VisionLoRAError(f"{index} is missing or unreadable ({err}); {again}.") from None
    for chunk in chunks:
        path = split_dir / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size:,} bytes instead of {chunk['chunk_bytes']:,}"
            raise VisionLoRAError(f"Chunk {path} is {found}; {again}.")


def read_info(uri: str) -> dict[str, Any]:
    """The `vision_lora_dataset.json` of an optimized dataset, local or remote, checked for completeness.

    Raises:
        FileNotFoundError / VisionLoRAError: not an optimized dataset, an interrupted one, or a split's index is
            missing.
    """
    uri = str(uri).rstrip("/")
    if is_remote(uri):
        _check_credentials(uri)
        require("litdata", "stream", "a remote optimized dataset")
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, DATASET_INFO)
            try:
                get_downloader(uri, tmp, []).download_file(f"{uri}/{DATASET_INFO}", local)
                text = Path(local).read_text(encoding="utf-8")
            except Exception as err:  # noqa: BLE001 - every storage client raises its own types
                raise VisionLoRAError(
                    f"Cannot read {uri}/{DATASET_INFO} ({type(err).__name__}: {err}); is {uri} an optimized dataset "
                    "written by `vision-lora optimize`, and are the storage credentials set?"
                ) from None
    else:
        root = Path(uri)
        if (root / _PARTIAL).exists() or not (root / DATASET_INFO).is_file():
            raise VisionLoRAError(
                f"{root} holds an incomplete optimized dataset (an interrupted `vision-lora optimize`?); run "
                "`vision-lora optimize` again to finish it."
            )
        text = (root / DATASET_INFO).read_text(encoding="utf-8")
        for split, count in json.loads(text).get("counts", {}).items():
            if count:
                _check_split(root / split)
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise VisionLoRAError(
            f"{uri}/{DATASET_INFO} is not valid JSON ({err}); run `vision-lora optimize` again."
        ) from None
    if info.get("format") != _FORMAT:
        raise VisionLoRAError(
            f"{uri}/{DATASET_INFO} is not a vision-lora optimized dataset (format {info.get('format')})."
        )
    return info


@functools.cache
def _dataset_class() -> type:
    """`StreamingImageDataset`, defined on first use: importing LitData costs seconds, so a run on an image folder
    never pays for it."""
    StreamingDataset = require("litdata", "stream", "an optimized (LitData) dataset").StreamingDataset  # noqa: N806

    class StreamingImageDataset(StreamingDataset):
        """One split of an optimized dataset, streamed by LitData and decoded into `(image, label, key)` samples
        (see `streaming_dataset`)."""

        def __init__(
            self,
            uri: str,
            pipeline,
            shuffle: bool,
            seed: int,
            bad_files: str,
            drop_last: bool | None,
            num_classes: int | None = None,
        ):
            super().__init__(uri, shuffle=shuffle, seed=seed, drop_last=drop_last)
            self.num_classes = num_classes  # multi-label: stored JSON lists become multi-hot targets
            self.pipeline = pipeline
            self.bad_files = bad_files
            self.vision_seed = seed

        def __getitem__(self, index):
            item = super().__getitem__(index)
            seed = None
            if self.shuffle and hasattr(index, "index"):  # training: augmentation seeded by epoch and sample
                # A fixed prime stride, not len(self): LitData recomputes its length on every call.
                seed = (self.vision_seed * 1_000_003 + self.current_epoch) * 1_000_000_007 + index.index
            key, label = item["key"], item["label"]
            if self.num_classes is not None:
                hot = [0.0] * self.num_classes
                for i in json.loads(label):
                    hot[i] = 1.0
                label = tuple(hot)
            else:
                label = int(label)
            return load_sample(key, bytes(item["image"]), label, self.pipeline, seed, self.bad_files)

    return StreamingImageDataset


def streaming_dataset(
    uri: str,
    pipeline,
    shuffle: bool,
    seed: int = 0,
    bad_files: str = "skip",
    drop_last: bool | None = None,
    num_classes: int | None = None,
):
    """One split of an optimized dataset as a LitData `StreamingDataset` of `(image, label, key)` samples.

    Args:
        uri: the split's folder or bucket prefix (e.g. `s3://bucket/pets/train`).
        pipeline: encoded bytes -> tensor (see `ImagePipeline`).
        shuffle: shuffle chunks and samples each epoch (training); the augmentation of each sample is then seeded
            by (seed, epoch, sample), so a resumed epoch draws what an uninterrupted one would.
        seed: seed of the shuffle and the augmentation.
        bad_files: "skip" returns a `BadSample` for an unreadable sample, "fail" raises.
        drop_last: under several ranks, trim each epoch to whole batches on every rank (training); False keeps
            every sample exactly once (evaluation).
        num_classes: for a multi-label dataset, the class count of its multi-hot targets.
    """
    return _dataset_class()(uri, pipeline, shuffle, seed, bad_files, drop_last, num_classes)
