"""Quickstart test accuracy with DoRA against LoRA, per seed: `configs/quickstart.yaml` as is, and with
`--model.use_dora true`, the two alternating. The JSON is rewritten after every run, so a partial sweep is kept.

    python benchmarks/dora_quickstart.py --seeds 0 1 2 --out benchmarks/results/dora_quickstart.json
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
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from data_pipeline import _test_acc  # noqa: E402 - the same reading of metrics.csv as the data accuracy runs

VARIANTS = {"lora": [], "dora": ["--model.use_dora=true"]}


def run(seed: int, variant: str, tmp: str) -> float | None:
    name = f"{variant}_seed{seed}"
    base = ["--config", str(REPO / "configs" / "quickstart.yaml"), f"--data.root={REPO / 'data' / 'digits'}"]
    base += [f"--seed_everything={seed}", f"--data.seed={seed}", *VARIANTS[variant]]
    log = [f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.logger.init_args.name={name}"]
    cli = [sys.executable, "-m", "vision_lora.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([*cli, "fit", *base, *log, "--trainer.enable_progress_bar=false"], check=True, cwd=tmp, env=env,
                   capture_output=True)  # fmt: skip
    best = next(Path(tmp, name, "version_0", "checkpoints").glob("best-*.ckpt"))
    subprocess.run([*cli, "test", *base, *log, f"--ckpt_path={best}", "--trainer.enable_progress_bar=false"],
                   check=True, cwd=tmp, env=env, capture_output=True)  # fmt: skip
    return _test_acc(Path(tmp, name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/dora_quickstart.json")
    args = p.parse_args()
    start = time.time()
    results: dict = {"test_acc": {v: {} for v in args.variants}}
    results["meta"] = {
        "date": str(date.today()),
        "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs (shared)",
        "command": " ".join(["python", "benchmarks/dora_quickstart.py", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                results["test_acc"][variant][seed] = run(seed, variant, tmp)
                done = {v: [a for a in accs.values() if a is not None] for v, accs in results["test_acc"].items()}
                results["mean"] = {v: statistics.mean(a) for v, a in done.items() if a}
                results["meta"]["seconds"] = round(time.time() - start)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
                print(f"[{time.time() - start:5.0f}s] seed {seed} {variant}: {results['test_acc'][variant][seed]}")


if __name__ == "__main__":
    main()
