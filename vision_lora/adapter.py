"""Old import path of the adapter files (now `vision_lora.lora.adapter`); kept for saved scripts."""

from .lora.adapter import *  # noqa: F403
from .lora.adapter import __all__  # noqa: F401
