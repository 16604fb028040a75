"""The one exception type for errors a user can fix, and the error for a command whose optional extra is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "VisionLoRAError", "require"]


class VisionLoRAError(ValueError):
    """An error the user can fix: a bad option, path, file or dataset, or a run that diverged. The message says what
    to change; `vision-lora` prints it as one line."""


class MissingExtraError(VisionLoRAError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the pip command."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, which the optional extra `extra` installs.

    Raises:
        MissingExtraError: it is not installed; the message names the pip command for `feature`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name != module and not module.startswith(f"{err.name}."):
            raise  # the package is there but something it imports is broken: show that, not a false hint
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install 'vision-lora[{extra}]'"
        ) from None
