"""LoRA fine-tuning of timm image classifiers."""

from .errors import VisionLoRAError
from .lora import (
    PRESETS,
    LoRAConfig,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    LoRAQKVLinear,
    LoRAReport,
    apply_lora,
    load_adapter,
    merge_lora,
    read_adapter_config,
    save_adapter,
    save_merged,
)
from .weights import create_backbone

__all__ = [
    "PRESETS",
    "ImageFolderDataModule",
    "LoRAClassifier",
    "export_onnx",
    "load_model",
    "load_rgb",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoRAQKVLinear",
    "LoRAReport",
    "VisionLoRAError",
    "apply_lora",
    "create_backbone",
    "load_adapter",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
]
__version__ = "0.1.0"

# Lightning and the data pipeline import slowly; these load on first use: `from vision_lora import LoRAClassifier`.
_LAZY = {
    "LoRAClassifier": "module",
    "ImageFolderDataModule": "data",
    "load_rgb": "data",
    "export_onnx": "deploy.onnx",
    "load_model": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
