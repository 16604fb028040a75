"""The Lightning-free LoRA core: options, targets, layers, injection, adapter files and PEFT's format."""

from .adapter import (
    adapter_state_dict,
    load_adapter,
    merged_state_dict,
    read_adapter_config,
    save_adapter,
    save_merged,
)
from .config import LoRAConfig, LoRAReport, LoRAReportRow
from .inject import (
    apply_lora,
    describe_targets,
    lora_layers,
    lora_report,
    mark_trainable,
    merge_lora,
    remove_lora,
    trainable_names,
)
from .kernels import QKVLayout
from .layers import LoRAConv2d, LoRALayer, LoRALinear, LoRAQKVLinear, dora_norm, lora_scaling
from .peft_format import is_peft_adapter, load_peft_adapter, save_peft_adapter
from .targets import PRESETS, classifier_names, qkv_layout, resolve_targets

__all__ = [
    "PRESETS",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoRAQKVLinear",
    "LoRAReport",
    "LoRAReportRow",
    "QKVLayout",
    "adapter_state_dict",
    "apply_lora",
    "classifier_names",
    "describe_targets",
    "dora_norm",
    "is_peft_adapter",
    "load_adapter",
    "load_peft_adapter",
    "lora_layers",
    "lora_report",
    "lora_scaling",
    "mark_trainable",
    "merge_lora",
    "merged_state_dict",
    "qkv_layout",
    "read_adapter_config",
    "remove_lora",
    "resolve_targets",
    "save_adapter",
    "save_merged",
    "save_peft_adapter",
    "trainable_names",
]
