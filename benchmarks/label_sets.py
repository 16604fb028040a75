"""Issue 24's offline data sets, built from the bundled digits (nothing is downloaded), and the studies on them.

    python benchmarks/label_sets.py build --out /tmp/label_sets
    python benchmarks/label_sets.py multilabel --data /tmp/label_sets --seeds 0 1 2
    python benchmarks/label_sets.py longtail --data /tmp/label_sets --seeds 0 1 2

`build` writes two sets:
- `mosaics/`: 32x32 PNGs of a 2x2 grid, each cell holding a digit (upscaled 2x) or nothing, 0 to 4 digits per image;
  the label is the set of digit classes present (`labels.jsonl`, lists; train / val / test from the digits' own
  splits, so no digit image is shared between splits).
- `longtail/`: the digits as a single-label CSV whose train and val splits fall off 1:20 from class 0 to class 9
  (exponentially), with the test split left balanced.

`multilabel` compares, per seed, `vision-lora fit` with its defaults (the recipe screen, the length from val) with
the plain loop's head-only probe of issue 23 (light augmentation, AdamW 1e-3 constant, 10 epochs), 64 px, flips off,
on `test_map`, and exports the seed-0 defaults model to int8 (exact label-set agreement). `longtail` trains with no
handling, `--model.class_weights auto`, `inverse`, `effective`, `--data.sampler balanced` and the recipe screen's
choice (`screen`) per seed and compares the test balanced accuracy (`test_balanced_acc`). Each run is its own
process; the JSON is rewritten after every run, and a study started again skips the runs it holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402

DIGITS = REPO / "data" / "digits"
# The long-tail study's options (3 epochs, no augmentation, recipe off unless a variant turns it on).
COMMON = [
    "--model.backbone=tf_efficientnet_lite0",
    "--model.weights=offline",
    "--model.target_modules=[preset:efficientnet]",
    "--model.input_size=64",
    "--model.crop_pct=1.0",
    "--data.augment=none",
    "--data.batch_size=32",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--recipe=off",
]
# The multi-label study's: what a user gives (backbone, weights, resolution, no flips for digits); the rest per variant.
MULTILABEL = [
    "--model.backbone=tf_efficientnet_lite0",
    "--model.weights=offline",
    "--model.input_size=64",
    "--data.hflip=0",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]
# Issue 23's plain loop as a head-only probe.
PLAIN_PROBE = [
    "--data.augment=light",
    "--recipe=off",
    "--model.lr=1e-3",
    "--model.label_smoothing=0",
    "--model.schedule=constant",
    "--model.head_warmup=1.0",
    "--trainer.max_epochs=10",
]


def _digits(split: str) -> list[tuple[Path, int]]:
    return sorted((p, int(p.parent.name)) for p in (DIGITS / split).glob("*/*.png"))


def build_mosaics(out: Path, counts: dict[str, int], seed: int = 0) -> None:
    rng = random.Random(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in counts.items():
        pool = _digits(split)
        for i in range(count):
            canvas = np.zeros((32, 32), dtype=np.uint8)
            present = set()
            for cell in range(4):
                if rng.random() < 0.5:
                    path, label = rng.choice(pool)
                    digit = np.asarray(Image.open(path).convert("L").resize((16, 16), Image.Resampling.NEAREST))
                    y, x = 16 * (cell // 2), 16 * (cell % 2)
                    canvas[y : y + 16, x : x + 16] = digit
                    present.add(str(label))
            name = f"img/{split}_{i}.png"
            Image.fromarray(canvas).convert("RGB").save(out / name)
            rows.append({"path": name, "label": sorted(present), "split": split})
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_longtail(out: Path, ratio: float = 20.0, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "val", "test"):
        by_class: dict[int, list[Path]] = {}
        for path, label in _digits(split):
            by_class.setdefault(label, []).append(path)
        for label, paths in sorted(by_class.items()):
            keep = len(paths) if split == "test" else max(1, round(len(paths) * ratio ** (-label / 9)))
            rng.shuffle(paths)
            rows += [(os.path.relpath(p, DIGITS), str(label), split) for p in sorted(paths[:keep])]
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)


def _fit_and_test(args: list[str], work: Path, name: str) -> dict[str, float]:
    logs = [f"--trainer.logger.init_args.save_dir={work}", f"--trainer.logger.init_args.name={name}"]
    command = [sys.executable, "-m", "vision_lora.cli"]
    subprocess.run([*command, "fit", *args, *logs], check=True, capture_output=True, timeout=3600)
    run = work / name / "version_0"
    subprocess.run(
        [*command, "test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"],
        check=True,
        capture_output=True,
        timeout=3600,
    )
    with open(run / "test" / "metrics.csv", newline="", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if any(k.startswith("test_") and v for k, v in r.items()))
    metrics = {k: float(v) for k, v in row.items() if k.startswith("test_") and v}
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {**metrics, "epochs": int(last["epoch"]) + 1, "steps": int(last["global_step"])}


def _int8(run: Path, seed: int) -> dict:
    """`vision-lora export --quantize int8` of the run's best checkpoint (always written: --min_agreement 0), with
    the exact label-set agreement it printed."""
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    output = run / "model.int8.onnx"
    command = [sys.executable, "-m", "vision_lora.cli", "export", "--ckpt_path", str(best), "--output", str(output)]
    done = subprocess.run(
        [*command, "--quantize", "int8", "--min_agreement", "0"], capture_output=True, text=True, timeout=1800
    )
    found = re.search(r"int8 vs fp32 on .*\): ([\w -]+) agreement ([\d.]+)%", done.stdout + done.stderr)
    return {
        "seed": seed,
        "written": output.is_file(),
        "measure": found.group(1).strip() if found else None,
        "agreement": float(found.group(2)) / 100 if found else None,
        "returncode": done.returncode,
    }


def study(kind: str, data: Path, seeds: list[int], out: Path, epochs: int, only: list[str] | None) -> None:
    if kind == "multilabel":
        source = [f"--data.labels={data / 'mosaics' / 'labels.jsonl'}", f"--data.root={data / 'mosaics'}"]
        common = MULTILABEL
        variants = {"defaults": [], "probe": PLAIN_PROBE}
        metric = "test_map"
    else:
        source = [f"--data.labels={data / 'longtail' / 'labels.csv'}", f"--data.root={DIGITS}"]
        common = [*COMMON, f"--trainer.max_epochs={epochs}"]
        variants = {
            "none": [],
            "auto": ["--model.class_weights=auto"],
            "inverse": ["--model.class_weights=inverse"],
            "balanced_sampler": ["--data.sampler=balanced"],
            # The defaults: `--recipe auto` screens no handling, balanced sampling and class weights on val.
            "screen": ["--recipe=auto"],
        }
        metric = "test_balanced_acc"
    if only:
        variants = {name: extra for name, extra in variants.items() if name in only}
    results: dict = {"kind": kind, "metric": metric, "args": common + source, "variants": variants, "runs": []}
    if out.is_file():  # a study stopped part-way goes on: runs of the same options are kept, not run again
        kept = json.loads(out.read_text())
        if kept.get("args") == results["args"] and kept.get("variants") == variants:
            results = kept
    results["machine"] = machine_info()
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for variant, extra in variants.items():
                if (variant, seed) in done:
                    continue
                args = [*common, *source, *extra, f"--seed_everything={seed}"]
                metrics = _fit_and_test(args, Path(tmp), f"{variant}_{seed}")
                results["runs"].append({"variant": variant, "seed": seed, **metrics})
                if kind == "multilabel" and variant == "defaults" and "int8" not in results:
                    results["int8"] = _int8(Path(tmp) / f"{variant}_{seed}" / "version_0", seed)
                print(json.dumps(results["runs"][-1]), flush=True)
                _summarise(results, variants, metric)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2) + "\n")


def _summarise(results: dict, variants: dict, metric: str) -> None:
    by = {v: {r["seed"]: r[metric] for r in results["runs"] if r["variant"] == v} for v in variants}
    base = next(iter(variants))
    summary = {}
    for variant in variants:
        values = list(by[variant].values())
        summary[variant] = {"mean": statistics.fmean(values) if values else None, "n": len(values)}
        if variant != base:
            paired = [by[variant][s] - by[base][s] for s in by[variant] if s in by[base]]
            summary[variant][f"mean_paired_minus_{base}"] = statistics.fmean(paired) if paired else None
    results["summary"] = summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["build", "multilabel", "longtail"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/label_sets"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="the long-tail study's epochs")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (the first is the base)")
    parser.add_argument("--mosaics", type=int, nargs=3, default=[1000, 250, 400], help="train, val, test images")
    args = parser.parse_args()
    if args.what == "build":
        build_mosaics(args.data / "mosaics", dict(zip(("train", "val", "test"), args.mosaics, strict=True)))
        build_longtail(args.data / "longtail")
        print(f"wrote {args.data / 'mosaics'} and {args.data / 'longtail'}")
        return
    out = args.out or REPO / "benchmarks" / "results" / f"labels_{args.what}.json"
    study(args.what, args.data, args.seeds, out, args.epochs, args.variants)


if __name__ == "__main__":
    main()
