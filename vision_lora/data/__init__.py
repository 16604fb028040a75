"""The data side: decoding, image-folder and optimized (LitData) sources, and the DataModule."""

from .datamodule import (
    AUGMENT_STANDARD_FROM,
    AUGMENTS,
    BadFileReport,
    ImageFolderDataModule,
    augment_for,
    preprocessing_config,
)
from .decode import IMAGE_EXTENSIONS, ImagePipeline, load_rgb
from .folder import FolderSource, image_files, stratified_split
from .samples import BadSample, CollatedBatch, EpochSampler, ImageFileDataset, SkipBadCollate
from .streaming import OptimizeReport, optimize_folder, read_info, streaming_dataset

__all__ = [
    "AUGMENTS",
    "AUGMENT_STANDARD_FROM",
    "IMAGE_EXTENSIONS",
    "BadFileReport",
    "BadSample",
    "CollatedBatch",
    "EpochSampler",
    "FolderSource",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImagePipeline",
    "OptimizeReport",
    "SkipBadCollate",
    "augment_for",
    "image_files",
    "load_rgb",
    "optimize_folder",
    "preprocessing_config",
    "read_info",
    "stratified_split",
    "streaming_dataset",
]
