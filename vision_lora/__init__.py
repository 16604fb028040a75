"""LoRA fine-tuning of timm image classifiers."""

from .adapter import load_adapter, read_adapter_config, save_adapter, save_merged
from .inject import PRESETS, LoRAConfig, LoRAReport, apply_lora, merge_lora
from .layers import LoRAConv2d, LoRALayer, LoRALinear, LoRAQKVLinear
from .weights import create_backbone

__all__ = [
    "PRESETS",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoRAQKVLinear",
    "LoRAReport",
    "apply_lora",
    "create_backbone",
    "load_adapter",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
]
__version__ = "0.1.0"
