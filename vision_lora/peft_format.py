"""Old import path of PEFT's adapter format (now `vision_lora.lora.peft_format`); kept for saved scripts."""

from .lora.peft_format import *  # noqa: F403
from .lora.peft_format import __all__  # noqa: F401
