"""Old import path of ONNX export, int8 and model loading (now `vision_lora.deploy` and `vision_lora.checkpoint`);
kept for saved scripts."""

from . import checkpoint
from .checkpoint import *  # noqa: F403
from .data.folder import image_files, labelled_images, preprocess_files
from .deploy import int8, onnx
from .deploy.int8 import *  # noqa: F403
from .deploy.onnx import *  # noqa: F403

__all__ = [*checkpoint.__all__, *int8.__all__, *onnx.__all__, "image_files", "labelled_images", "preprocess_files"]
