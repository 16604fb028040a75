"""The digits with nothing but the defaults of `vision-lora fit` (the recipe screen and the curve-decided length)
beside the quickstart config, alternating in one run: test accuracy, wall time, optimizer steps.

    python benchmarks/digits_defaults.py --rounds 2 --out benchmarks/results/digits_defaults.json

Defaults: `vision-lora fit --model.backbone tf_efficientnet_lite0 --data.root data/digits --model.input_size 96
--data.hflip 0`, then `vision-lora test` of its best checkpoint; the quickstart: `configs/quickstart.yaml`. Each fit
is its own process; the JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402
from data_pipeline import _test_acc  # noqa: E402

DATA = ["--data.root", str(REPO / "data" / "digits")]
VARIANTS = {
    "defaults": ["--model.backbone=tf_efficientnet_lite0", *DATA, "--model.input_size=96", "--data.hflip=0"],
    "quickstart": ["--config", str(REPO / "configs" / "quickstart.yaml"), *DATA],
}


def run(variant: str, round_: int, work: str) -> dict:
    name = f"{variant}_{round_}"
    logs = [f"--trainer.logger.init_args.save_dir={work}", f"--trainer.logger.init_args.name={name}"]
    args = [*VARIANTS[variant], *logs]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = [sys.executable, "-m", "vision_lora.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    fit = subprocess.run([*cli, "fit", *args], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if fit.returncode != 0:
        raise RuntimeError(fit.stderr[-3000:])
    run_dir = Path(work, name, "version_0")
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    subprocess.run([*cli, "test", *args, f"--ckpt_path={best}"], cwd=work, env=env, check=True, capture_output=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    lines = [line for line in (fit.stdout + fit.stderr).splitlines() if line.startswith("recipe: ")]
    return {"test_acc": _test_acc(Path(work, name)), "fit_seconds": round(seconds, 1),
            "steps": int(last["global_step"]), "epochs": int(last["epoch"]) + 1, "recipe": lines}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "digits_defaults.json")
    args = parser.parse_args()
    result = {"command": "python benchmarks/digits_defaults.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for variant in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
                row = {"variant": variant, "round": round_, **run(variant, round_, work)}
                print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
                result["runs"].append(row)
                ratios = [
                    d["fit_seconds"] / q["fit_seconds"]
                    for d in result["runs"] if d["variant"] == "defaults"
                    for q in result["runs"] if q["variant"] == "quickstart" and q["round"] == d["round"]
                ]  # fmt: skip
                result["wall_ratio_per_round"] = ratios
                result["wall_ratio_median"] = statistics.median(ratios) if ratios else None
                args.out.write_text(json.dumps(result, indent=1))
    print(f"defaults / quickstart wall time per round: {result['wall_ratio_per_round']}")


if __name__ == "__main__":
    main()
