"""Old import path of ONNX export, int8 and model loading (now `vision_lora.deploy` and `vision_lora.checkpoint`);
kept for saved scripts."""

from .checkpoint import TrainedModel, build_from_adapter, load_model
from .data.folder import image_files, labelled_images, preprocess_files
from .deploy.int8 import INT8_OP_TYPES, QuantizationReport, quantize_int8, quantize_trained
from .deploy.onnx import INPUT_NAME, OUTPUT_NAME, ExportReport, export_onnx, read_onnx_metadata

__all__ = [
    "INPUT_NAME",
    "INT8_OP_TYPES",
    "OUTPUT_NAME",
    "ExportReport",
    "QuantizationReport",
    "TrainedModel",
    "build_from_adapter",
    "export_onnx",
    "image_files",
    "labelled_images",
    "load_model",
    "preprocess_files",
    "quantize_int8",
    "quantize_trained",
    "read_onnx_metadata",
]
