"""Single-label runs unchanged: the quickstart's `train_loss_step` column, trained by this checkout and by a reference
checkout (e.g. main where issue 24 started, `git archive <commit> | tar -x -C DIR`), must be equal value for value.

    python benchmarks/single_label_unchanged.py --reference /tmp/main_snapshot --epochs 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import machine_info

HERE = Path(__file__).resolve().parent.parent


def train_losses(checkout: Path, out: Path, epochs: int) -> list[str]:
    """The `train_loss_step` column (as written, text) of the quickstart trained by `checkout` for `epochs`."""
    command = [
        sys.executable,
        "-m",
        "vision_lora.cli",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True, timeout=1800)
    (metrics,) = out.glob("quickstart/version_*/metrics.csv")
    with open(metrics, newline="", encoding="utf-8") as f:
        return [row["train_loss_step"] for row in csv.DictReader(f) if row.get("train_loss_step")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="the checkout to compare with")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", type=Path, default=HERE / "benchmarks/results/single_label_unchanged.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = train_losses(HERE, Path(tmp) / "ours", args.epochs)
        theirs = train_losses(args.reference.resolve(), Path(tmp) / "reference", args.epochs)
    equal = ours == theirs
    result = {
        "check": "quickstart train_loss_step, this checkout vs the reference, value for value",
        "epochs": args.epochs,
        "steps": len(ours),
        "equal": equal,
        "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None),
        "ours_first_last": [ours[0], ours[-1]] if ours else None,
        "reference_first_last": [theirs[0], theirs[-1]] if theirs else None,
        "machine": machine_info(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    raise SystemExit(0 if equal and len(ours) == len(theirs) and ours else 1)


if __name__ == "__main__":
    main()
