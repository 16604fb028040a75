"""Old import path of the LoRA layers (now `vision_lora.lora.layers`); kept for saved scripts."""

from .lora.layers import *  # noqa: F403
from .lora.layers import __all__  # noqa: F401
