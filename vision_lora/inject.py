"""Old import path of the LoRA options, targets and injection (now `vision_lora.lora`); kept for saved scripts.
`python -m vision_lora.inject MODEL` is `vision-lora targets MODEL`."""

from .lora.config import LoRAConfig, LoRAReport, LoRAReportRow
from .lora.inject import (
    apply_lora,
    describe_targets,
    lora_layers,
    lora_report,
    mark_trainable,
    merge_lora,
    remove_lora,
    trainable_names,
)
from .lora.targets import PRESETS, classifier_names, qkv_layout, resolve_targets

__all__ = [
    "LoRAConfig",
    "LoRAReport",
    "LoRAReportRow",
    "PRESETS",
    "apply_lora",
    "classifier_names",
    "describe_targets",
    "lora_layers",
    "lora_report",
    "main",
    "mark_trainable",
    "merge_lora",
    "remove_lora",
    "qkv_layout",
    "resolve_targets",
    "trainable_names",
]


def main(args: list[str] | None = None) -> None:
    """`python -m vision_lora.inject MODEL [--r 8] ...`: the same as `vision-lora targets MODEL [--r 8] ...`."""
    import json
    import sys

    from .cli import main as cli

    argv, out = list(sys.argv[1:] if args is None else args), []
    while argv:  # this entry point took `--target_modules a b`; `vision-lora targets` takes a list
        arg = argv.pop(0)
        if arg in ("--target_modules", "--exclude_modules"):
            values = []
            while argv and not argv[0].startswith("--"):
                values.append(argv.pop(0))
            arg = f"{arg}={json.dumps(values)}"
        out.append(arg)
    cli(["targets", *out])


if __name__ == "__main__":
    main()
