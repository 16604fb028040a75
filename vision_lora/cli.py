"""`vision-lora`: one table of commands. The Trainer commands run through LightningCLI (`trainer_cli.py`); the
others are typed functions whose signatures and docstrings jsonargparse turns into their options and `--help`."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import NamedTuple

from . import __version__
from .errors import require

__all__ = ["COMMANDS", "main"]


class Command(NamedTuple):
    """A command of `vision-lora`: where its function lives, the extra it needs, and its one-line description.

    A typed function is handed to jsonargparse's CLI; a `run_*` function parses its command line itself."""

    module: str
    function: str
    extra: str | None
    description: str


_TRAINER = ("vision_lora.trainer_cli", "run_trainer_command", None)
COMMANDS: dict[str, Command] = {
    "fit": Command(*_TRAINER, "train LoRA adapters + head of a timm model on an image folder or optimized dataset"),
    "validate": Command(*_TRAINER, "evaluate a checkpoint on the val split (results beside its run)"),
    "test": Command(*_TRAINER, "evaluate a checkpoint on the test split (results beside its run)"),
    "predict": Command(*_TRAINER, "classify a folder of images with a checkpoint (a predictions CSV beside its run)"),
    "export": Command(
        "vision_lora.commands", "export", None, "merge LoRA and write ONNX or OpenVINO (verified; int8), timm or PEFT"
    ),
    "serve": Command("vision_lora.deploy.serve", "serve", "serve", "serve a model over HTTP with dynamic batching"),
    "optimize": Command(
        "vision_lora.commands",
        "optimize",
        "stream",
        "write an image folder, label file or HF dataset as LitData shards",
    ),
    "targets": Command("vision_lora.commands", "targets", None, "print what LoRA would adapt in a timm model"),
    "explain": Command("vision_lora.explain", "explain", None, "write Grad-CAM overlays of images for a checkpoint"),
    "tune": Command(
        "vision_lora.tune", "run_tune_command", "tune", "search fit's options with Optuna (pruning, several processes)"
    ),
}
_NEEDS = {"serve": "litserve", "stream": "litdata", "tune": "optuna"}  # the module each extra brings


def usage() -> str:
    """The text of `vision-lora --help`."""
    width = max(map(len, COMMANDS))
    lines = [
        f"vision-lora {__version__}: LoRA fine-tuning of timm image classifiers",
        "",
        "usage: vision-lora COMMAND [OPTIONS]    (vision-lora COMMAND --help for its options)",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.description}" for name, command in COMMANDS.items()),
    ]
    return "\n".join(lines)


def _run(name: str, args: list[str], from_argv: bool) -> None:
    command = COMMANDS[name]
    if command.extra is not None:
        require(_NEEDS[command.extra], command.extra, f"vision-lora {name}")
    function = getattr(importlib.import_module(command.module), command.function)
    if command.function.startswith("run_"):  # it parses its command line itself: the Trainer verbs, tune
        function(None if from_argv else [name, *args])  # LightningCLI reads sys.argv itself
        return
    from jsonargparse import CLI

    CLI(function, args=args, prog=f"vision-lora {name}")


def _one_line(err: BaseException) -> str:
    message = str(err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met code, not tensors
        found = [line.strip() for line in message.splitlines() if "Unsupported global" in line]
        message = "refusing to unpickle a checkpoint that holds more than tensors and plain data" + (
            f" ({found[0]})" if found else ""
        )
    return message


def main(args: list[str] | None = None) -> None:
    """Entry point of `vision-lora`; `args` replaces `sys.argv[1:]` (for tests and notebooks).

    Errors a user can fix (bad paths, options, data: `VisionLoRAError`, and disk errors) end with one line on stderr
    and exit status 1; set VISION_LORA_TRACEBACK=1 to see the traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        print(__version__)
        return
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nvision-lora: error: unknown command {argv[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        _run(argv[0], argv[1:], from_argv=args is None)
    except (ValueError, OSError, pickle.UnpicklingError) as err:  # ValueError: VisionLoRAError and library checks
        if os.environ.get("VISION_LORA_TRACEBACK"):
            raise
        print(f"vision-lora: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
