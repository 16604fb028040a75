"""Old import path of the LoRA options, targets and injection (now `vision_lora.lora`); kept for saved scripts.
`python -m vision_lora.inject MODEL` is `vision-lora targets MODEL`."""

from .lora import config, inject, targets
from .lora.config import *  # noqa: F403
from .lora.inject import *  # noqa: F403
from .lora.targets import *  # noqa: F403

__all__ = [*config.__all__, *inject.__all__, *targets.__all__, "main"]


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
