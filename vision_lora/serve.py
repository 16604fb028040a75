"""Old import path of `vision-lora serve` (now `vision_lora.deploy.serve`); kept for saved scripts."""

from .deploy.serve import *  # noqa: F403
from .deploy.serve import __all__  # noqa: F401
