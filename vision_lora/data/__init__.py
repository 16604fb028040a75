"""The data side: decoding, image-folder and optimized (LitData) sources, and the DataModule (which needs Lightning
and loads on first use, so that decoding and the sources import without it)."""

from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImagePipeline, ImageTooLargeError, decode_image, load_rgb
from .folder import FolderSource, image_files, labelled_images, preprocess_files, readable_files, stratified_split
from .samples import BadSample, CollatedBatch, EpochSampler, ImageFileDataset, SkipBadCollate
from .streaming import OptimizeReport, optimize_folder, read_info, streaming_dataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadSample",
    "CollatedBatch",
    "EpochSampler",
    "FolderSource",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImagePipeline",
    "ImageTooLargeError",
    "OptimizeReport",
    "SkipBadCollate",
    "decode_image",
    "image_files",
    "labelled_images",
    "load_rgb",
    "optimize_folder",
    "preprocess_files",
    "readable_files",
    "read_info",
    "stratified_split",
    "streaming_dataset",
    "train_counts",
]


_LAZY = {"ImageFolderDataModule", "train_counts"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
