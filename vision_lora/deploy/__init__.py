"""Deployment: ONNX export and verification (`onnx`), int8 quantization (`int8`), OpenVINO IRs (`openvino`, which
needs the [openvino] extra) and HTTP serving (`serve`, which needs the [serve] extra); the last two are imported on
their own."""

from .int8 import INT8_OP_TYPES, QuantizationReport, quantize_int8, quantize_trained
from .onnx import INPUT_NAME, OUTPUT_NAME, ExportReport, export_onnx, read_onnx_metadata

__all__ = [
    "INPUT_NAME",
    "INT8_OP_TYPES",
    "OUTPUT_NAME",
    "ExportReport",
    "QuantizationReport",
    "export_onnx",
    "quantize_int8",
    "quantize_trained",
    "read_onnx_metadata",
]
