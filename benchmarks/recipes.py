"""Recipe study: does `vision-lora fit` with its defaults hold on small datasets nobody tuned it for?

    python benchmarks/recipes.py --stage study          # issue 23: defaults vs the plain loop, held-out sets, 3 seeds
    python benchmarks/recipes.py --stage screen --budget-minutes 120   # the variant screen of issue 16
    python benchmarks/recipes.py --summary              # only print the tables of what finished

The study stage (issue 23) compares the CLI's defaults (`--recipe auto`: the augmentation screened on the run's val
split, the length from the val curve) with the plain loop (`PLAIN`: the eval transform plus a flip where flips are
allowed, AdamW 1e-3, weight decay 0.01, constant rate, no label smoothing, batch 32, 10 epochs, frozen BatchNorm, the
best val epoch) as a head-only probe (CLI) and as PEFT LoRA (a loop of its own, `run_peft`), and with last round's
defaults (their rules, on today's fixed preprocessing), on the held-out datasets named in `HELD_OUT` before any
result was read. Issue 16's results are in benchmarks/results/recipes_r2.json.

Drives the CLI end to end, in this process (`vision_lora.cli.main`): `fit`, then `test` of the checkpoint that val
selected, on the datasets of `recipe_datasets.py` (built offline from scikit-image / scikit-learn sample photos;
their test splits come from other photo regions or other photos than val). The backbone is tf_efficientnet_lite0
with its offline ImageNet weights: the only pretrained weights reachable on a machine without the model hub.

Stages: "screen" runs every variant with seed 0 at 96 px; "confirm" runs the best screened candidates (ranked on the
tuning datasets only), the baselines and the new CLI defaults with seeds 0, 1, 2 at 128 px. "peft" is a plain PEFT
LoRA loop (no CLI), the reference of the issue. Each run's result is written to the JSON as soon as it finishes,
and finished runs are skipped on a restart, so the study can run across sessions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402
from recipe_datasets import DATASETS, build  # noqa: E402

# The defaults are chosen on these; the goals are checked on the others.
TUNING = ("textures", "scenes", "tints", "fewshot_tune")
# Named before the first result of the study was read; digits_shift and faces are real images new to this study.
HELD_OUT = ("orientation", "colour", "fewshot", "digits_shift", "faces")
BACKBONE = "tf_efficientnet_lite0"

# Every variant names its augmentation and learning rates explicitly, so results do not move with the CLI defaults.
LIGHT = ["--data.augment=light"]
STANDARD = ["--data.augment=standard"]  # timm's: random-resized crop 0.08-1, flip, colour jitter 0.4
# The plain loop's options (the reference of issue 23); its length is PLAIN_EPOCHS.
PLAIN = [*LIGHT, "--recipe=off", "--model.lr=1e-3", "--model.label_smoothing=0", "--model.schedule=constant"]
PLAIN_EPOCHS = 10
VARIANTS: dict[str, list[str]] = {
    # In the order they run: the comparisons that decide the most first (a partial screen still answers them).
    "probe": [*PLAIN, "--model.head_warmup=1.0"],
    # Issue 23: the plain loop with vision_lora's LoRA, and with weight averaging of what trains.
    "plain_lora": PLAIN,
    "plain_lora_ema": [*PLAIN, "--trainer.callbacks+=vision_lora.averaging.TrainableEMA"],
    "light": [*LIGHT, "--model.lr=1e-3", "--model.label_smoothing=0.1"],
    "old_defaults": [*STANDARD, "--model.lr=1e-3", "--model.label_smoothing=0.1"],
    "peft": [],  # the plain PEFT loop, see run_peft
    "old_quickstart": [
        *STANDARD,
        "--data.scale=[0.6, 1.0]",
        "--data.hflip=0",
        "--data.color_jitter=null",
        "--model.lr=3e-3",
        "--model.head_lr=3e-3",
        "--model.label_smoothing=0.1",
        "--model.crop_pct=1.0",
    ],
    "light_warm": [*LIGHT, "--model.lr=1e-3", "--model.label_smoothing=0.1", "--model.head_warmup=0.25"],
    "none": ["--data.augment=none", "--model.lr=1e-3", "--model.label_smoothing=0.1"],
    "light_ls0": [*LIGHT, "--model.lr=1e-3", "--model.label_smoothing=0"],
    "light_hlr1e-2": [*LIGHT, "--model.lr=1e-3", "--model.head_lr=1e-2", "--model.label_smoothing=0.1"],
    "mild": [*STANDARD, "--data.scale=[0.5, 1.0]", "--data.color_jitter=null", "--model.lr=1e-3"],
    "light_lr3e-3": [*LIGHT, "--model.lr=3e-3", "--model.label_smoothing=0.1"],
    "light_warm_hlr1e-2": [
        *LIGHT,
        "--model.lr=1e-3",
        "--model.head_lr=1e-2",
        "--model.label_smoothing=0.1",
        "--model.head_warmup=0.25",
    ],
    "standard_warm": [*STANDARD, "--model.lr=1e-3", "--model.label_smoothing=0.1", "--model.head_warmup=0.25"],
    "probe_hlr1e-2": [*LIGHT, "--model.head_warmup=1.0", "--model.lr=1e-2", "--model.label_smoothing=0"],
    "light_long": [*LIGHT, "--model.lr=1e-3", "--model.label_smoothing=0.1"],  # twice the epochs
    # Added after the first screen results (standard augmentation ahead of light on both tuning datasets).
    "standard_ls0": [*STANDARD, "--model.lr=1e-3", "--model.label_smoothing=0"],
    "standard_lr3e-3": [*STANDARD, "--model.lr=3e-3", "--model.label_smoothing=0.1"],
    "standard_hlr1e-2": [*STANDARD, "--model.lr=1e-3", "--model.head_lr=1e-2", "--model.label_smoothing=0.1"],
    "standard_long": [*STANDARD, "--model.lr=1e-3", "--model.label_smoothing=0.1"],  # twice the epochs
    # Added for the two regimes the first held-out results exposed (tuning sets tints and fewshot_tune).
    "standard_nojitter": [*STANDARD, "--data.color_jitter=null", "--model.lr=1e-3", "--model.label_smoothing=0.1"],
    "light_warm50": [*LIGHT, "--model.lr=1e-3", "--model.label_smoothing=0.1", "--model.head_warmup=0.5"],
    "light_lr3e-4": [*LIGHT, "--model.lr=3e-4", "--model.head_lr=1e-3", "--model.label_smoothing=0.1"],
}
LONG = ("light_long", "standard_long")
BASELINES = ("probe", "old_defaults", "old_quickstart", "peft")
NOT_CANDIDATES = (*BASELINES, "probe_hlr1e-2", "plain_lora", "plain_lora_ema")
CONFIRM_REFERENCES = ("probe", "peft")  # the goals compare the defaults with these
# The CLI with nothing but backbone, data and resolution: whatever `vision-lora fit` does by default now.
NEW_DEFAULTS = "new_defaults"
# Last round's defaults, by their rules (`last_round_defaults`).
LAST_DEFAULTS = "last_defaults"
STUDY = (NEW_DEFAULTS, "probe", "peft", LAST_DEFAULTS)
STUDY_PX = 96


def last_round_epochs(folder: Path, batch_size: int = 32) -> int:
    """Issue 16's epoch rule: about 150 optimizer steps, 5 to 30 epochs."""
    import math

    return max(5, min(30, math.ceil(150 / max(math.ceil(train_count(folder) / batch_size), 1))))


def last_round_defaults(folder: Path, batch_size: int = 32) -> list[str]:
    """The options issue 16's rules chose for `folder`: standard augmentation from 10 training images per class (else
    light), about 150 optimizer steps (5 to 30 epochs), label smoothing 0.1, warmup + cosine decay."""
    images = train_count(folder)
    classes = sum(1 for p in (folder / "train").iterdir() if p.is_dir())
    augment = "standard" if images / classes >= 10 else "light"
    epochs = last_round_epochs(folder, batch_size)
    return [f"--data.augment={augment}", f"--trainer.max_epochs={epochs}", "--recipe=off", "--model.lr=1e-3",
            "--model.label_smoothing=0.1", "--model.schedule=cosine"]  # fmt: skip


def train_count(folder: Path) -> int:
    return sum(1 for _ in (folder / "train").rglob("*.jpg"))


def _metric(run: Path, key: str) -> float | None:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        values = [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values[-1] if values else None


def run_cli(data: Path, variant: str, seed: int, px: int, epochs: int | None, work: Path) -> dict:
    """`vision-lora fit` then `vision-lora test` of the best checkpoint; test accuracy and val accuracy of it."""
    from vision_lora.cli import main

    name = f"{data.name}-{variant}-s{seed}-{px}"
    common = [f"--data.root={data}", f"--model.input_size={px}", f"--seed_everything={seed}"]
    logging = [f"--trainer.logger.init_args.save_dir={work}", f"--trainer.logger.init_args.name={name}"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=1"]
    args = [*common, *logging, *quiet, f"--model.backbone={BACKBONE}"]
    if variant == LAST_DEFAULTS:
        args += ["--model.weights=offline", "--trainer.accelerator=cpu", *last_round_defaults(data)]
    elif variant != NEW_DEFAULTS:
        args += ["--model.weights=offline", "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}"]
        args += VARIANTS[variant]
    args += list(DATASETS[data.name].extra_args)
    shutil.rmtree(work / name, ignore_errors=True)  # a run stopped part-way is started again from scratch
    start = time.perf_counter()
    main(["fit", *args])
    run = work / name / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={best}", *quiet])
    import torch

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with open(run / "config.yaml", encoding="utf-8") as f:
        augment = next((line.split(":")[1].strip() for line in f if line.strip().startswith("augment:")), None)
    return {
        "steps": int(last["global_step"]),
        "augment": augment,
        "test_acc": _metric(run / "test", "test_acc"),
        "val_acc": float(best.stem.rsplit("val_acc=", 1)[1]) if "val_acc=" in best.stem else None,
        "best_epoch": int(best.stem.split("epoch=")[1].split("-")[0]),
        "epochs": int(last["epoch"]) + 1,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_peft(data: Path, seed: int, px: int, epochs: int, batch_size: int = 32) -> dict:
    """The plain loop with PEFT LoRA: r=8, alpha 16 on the targets vision-lora adapts by default, head trained in
    full; the eval transform plus a flip where the dataset allows flips; AdamW lr 1e-3 constant, weight decay 0.01,
    cross-entropy without smoothing; BatchNorm frozen in eval mode. Test accuracy of the epoch with the best val
    accuracy."""
    import peft
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from vision_lora.data import load_rgb
    from vision_lora.inject import LoRAConfig, resolve_targets
    from vision_lora.preprocess import eval_transform, resolve_data_config
    from vision_lora.weights import create_backbone

    start = time.perf_counter()
    torch.manual_seed(seed)
    classes = sorted(p.name for p in (data / "train").iterdir())
    model = create_backbone(BACKBONE, num_classes=len(classes), weights="offline")
    targets = resolve_targets(model, LoRAConfig())
    evaluate = eval_transform(resolve_data_config(model, {"input_size": px}))
    steps = list(evaluate.transforms)
    flips = "--data.hflip=0" not in DATASETS[data.name].extra_args
    train_tf = T.Compose([*steps[:2], *([T.RandomHorizontalFlip()] if flips else []), *steps[2:]])
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"])
    model = peft.get_peft_model(model, config)

    def loader(split: str, transform, shuffle: bool) -> DataLoader:
        dataset = ImageFolder(str(data / split), transform=transform, loader=load_rgb)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=1)

    train, val, test = loader("train", train_tf, True), loader("val", evaluate, False), loader("test", evaluate, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    @torch.no_grad()
    def accuracy(batches: DataLoader) -> float:
        model.eval()
        right = total = 0
        for x, y in batches:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return right / total

    best = (-1.0, 0.0, -1)
    for epoch in range(epochs):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc = accuracy(val)
        if val_acc > best[0]:
            best = (val_acc, accuracy(test), epoch)
    return {
        "test_acc": best[1],
        "val_acc": best[0],
        "best_epoch": best[2],
        "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- the plan -------------------------------------------------------------------------------------------------------


def key(stage: str, dataset: str, variant: str, seed: int, px: int) -> str:
    return f"{stage}/{dataset}/{variant}/seed{seed}/{px}px"


def run_epochs(folder: Path, variant: str, batch_size: int = 32) -> int:
    """The plain loop's epochs for its variants; else issue 16's rule (twice it for the LONG variants)."""
    if variant in ("probe", "peft", "plain_lora", "plain_lora_ema"):
        return PLAIN_EPOCHS
    return last_round_epochs(folder, batch_size) * (2 if variant in LONG else 1)


def study_plan(datasets: list[str], folders: dict[str, Path], variants: list[str] | None = None) -> list[tuple]:
    """Issue 23's study: the defaults, the plain-loop probe and PEFT LoRA and last round's defaults, seeds 0, 1, 2, on
    the held-out datasets (then the tuning ones), seed by seed so that a partial run is balanced."""
    order = [d for d in (*HELD_OUT, *TUNING) if d in datasets]
    return [
        ("study", dataset, variant, seed, STUDY_PX, run_epochs(folders[dataset], variant))
        for seed in (0, 1, 2)
        for dataset in order
        for variant in variants or STUDY
    ]


def study_summary(runs: dict) -> list[str]:
    """The goals of issue 23 per held-out dataset: defaults − max(probe, PEFT) and defaults − last round's defaults
    (paired by seed), and the optimizer steps of the defaults against the plain loop's."""
    out = []
    for d in HELD_OUT:
        vs_best, vs_last, steps = [], [], []
        for seed in (0, 1, 2):
            got = {v: runs.get(key("study", d, v, seed, STUDY_PX)) for v in STUDY}
            if not got[NEW_DEFAULTS]:
                continue
            ours = got[NEW_DEFAULTS]["test_acc"]
            if got["probe"] and got["peft"]:
                vs_best.append(100 * (ours - max(got["probe"]["test_acc"], got["peft"]["test_acc"])))
            if got[LAST_DEFAULTS]:
                vs_last.append(100 * (ours - got[LAST_DEFAULTS]["test_acc"]))
            steps.append(got[NEW_DEFAULTS].get("steps"))

        def fmt(diffs: list[float]) -> str:
            return f"{statistics.mean(diffs):+.1f} pt (n={len(diffs)})" if diffs else "—"

        out.append(f"{d}: defaults − max(probe, peft) {fmt(vs_best)}; defaults − last round's {fmt(vs_last)}; "
                   f"steps of the defaults {steps}")  # fmt: skip
    return out


def screen_plan(datasets: list[str], folders: dict[str, Path]) -> list[tuple]:
    """Every variant, seed 0, 96 px, on the tuning datasets only: the held-out ones never take part in the choice."""
    plan = []
    for variant in VARIANTS:
        for dataset in (d for d in TUNING if d in datasets):
            plan.append(("screen", dataset, variant, 0, 96, run_epochs(folders[dataset], variant)))
    return plan


def best_candidates(results: dict, top: int) -> list[str]:
    """The `top` candidates of the screen with the highest mean test accuracy on the tuning datasets."""
    scores = {}
    for variant in VARIANTS:
        if variant in NOT_CANDIDATES:
            continue
        accs = [results.get(key("screen", d, variant, 0, 96), {}).get("test_acc") for d in TUNING]
        if all(a is not None for a in accs):
            scores[variant] = statistics.mean(accs)
    return sorted(scores, key=scores.get, reverse=True)[:top]


def confirm_plan(
    datasets: list[str], folders: dict[str, Path], results: dict, top: int, only: list[str] | None = None
) -> list[tuple]:
    """Seeds 0, 1, 2 at 128 px of the references (probe, PEFT), the new CLI defaults and the best screened candidates
    (or of the variants `only`); the held-out datasets first (the goals are checked there), seed by seed, so a partial
    run is balanced."""
    variants = only or [*CONFIRM_REFERENCES, NEW_DEFAULTS, *best_candidates(results, top)]
    order = [d for d in (*HELD_OUT, *TUNING) if d in datasets]
    plan = []
    for seed in (0, 1, 2):
        for dataset in order:
            for variant in variants:
                plan.append(("confirm", dataset, variant, seed, 128, run_epochs(folders[dataset], variant)))
    return plan


# -- results --------------------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"meta": {}, "runs": {}}


def save(path: Path, state: dict) -> None:
    """Write `state`, merged with the runs other study processes wrote meanwhile (under a lock: they share the file;
    split the work between them with --datasets / --variants)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load(path)
        state["runs"] = {**on_disk["runs"], **state["runs"]}
        commands = on_disk["meta"].get("commands", [])
        state["meta"]["commands"] = commands + [c for c in state["meta"].get("commands", []) if c not in commands]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, path)


def table(runs: dict, stage: str, px: int) -> tuple[str, dict]:
    """Markdown table of mean test accuracy (± standard deviation over seeds; the val accuracy that selected the
    checkpoint in brackets) per variant and dataset."""
    cell: dict[tuple[str, str], list[float]] = {}
    val: dict[tuple[str, str], list[float]] = {}
    for k, r in runs.items():
        st, dataset, variant, _, size = k.split("/")
        if st == stage and size == f"{px}px" and r.get("test_acc") is not None:
            cell.setdefault((variant, dataset), []).append(r["test_acc"])
            val.setdefault((variant, dataset), []).append(r.get("val_acc") or float("nan"))
    datasets = [d for d in DATASETS if any(d == ds for _, ds in cell)]
    variants = [v for v in [*VARIANTS, NEW_DEFAULTS, LAST_DEFAULTS] if any(v == var for var, _ in cell)]
    head = "| variant | " + " | ".join(f"{d}{'*' if d in HELD_OUT else ''}" for d in datasets) + " | held-out mean |"
    lines = [head, "|" + "---|" * (len(datasets) + 2)]
    means = {}
    for v in variants:
        row = []
        for d in datasets:
            accs = cell.get((v, d))
            spread = f" ±{statistics.stdev(accs):.3f}" if accs and len(accs) > 1 else ""
            vals = val.get((v, d))
            row.append(f"{statistics.mean(accs):.3f}{spread} (val {statistics.mean(vals):.3f})" if accs else "—")
            if accs:
                means[(v, d)] = statistics.mean(accs)
        held = [means[(v, d)] for d in HELD_OUT if (v, d) in means]
        held_mean = f"{statistics.mean(held):.3f}" if len(held) == len(HELD_OUT) else "—"
        lines.append(f"| {v} | " + " | ".join(row) + f" | {held_mean} |")
    return "\n".join(lines), {"cell": cell, "means": means}


def paired(runs: dict, stage: str, px: int, a: str, b: str) -> list[str]:
    """Per held-out dataset: mean and spread (min..max over seeds) of test_acc(a) - test_acc(b), same seed."""
    out = []
    for d in HELD_OUT:
        diffs = []
        for seed in (0, 1, 2):
            ra, rb = runs.get(key(stage, d, a, seed, px)), runs.get(key(stage, d, b, seed, px))
            if ra and rb and ra.get("test_acc") is not None and rb.get("test_acc") is not None:
                diffs.append(100 * (ra["test_acc"] - rb["test_acc"]))
        if diffs:
            out.append(f"{d}: {statistics.mean(diffs):+.1f} pt [{min(diffs):+.1f}, {max(diffs):+.1f}] (n={len(diffs)})")
    return out


def summary(state: dict) -> str:
    runs = state["runs"]
    parts = []
    for stage, px in (("study", STUDY_PX), ("screen", 96), ("confirm", 128)):
        text, _ = table(runs, stage, px)
        if text.count("\n") > 1:
            seconds = sum(r.get("seconds", 0) for k, r in runs.items() if k.startswith(stage + "/"))
            parts.append(f"### {stage} ({px} px; * held out; {seconds / 3600:.1f} h of runs)\n\n{text}")
            if stage == "study":
                parts.extend(study_summary(runs))
                continue
            for ref in ("probe", "peft", "old_defaults"):
                cmp_with = NEW_DEFAULTS if stage == "confirm" else "light"
                lines = paired(runs, stage, px, cmp_with, ref)
                if lines:
                    parts.append(f"{cmp_with} − {ref}: " + "; ".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipes.json")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vision_lora_recipe_data")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vision_lora_recipe_runs")
    parser.add_argument("--stage", choices=("study", "screen", "confirm", "all"), default="study")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="only these variants (default: screen all; confirm the references, the defaults and the --top screened)",
    )
    parser.add_argument("--top", type=int, default=3, help="screened candidates to confirm")
    parser.add_argument("--budget-minutes", type=float, default=600, help="start no run after this long")
    parser.add_argument("--summary", action="store_true", help="print the tables and exit")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    args = parser.parse_args()

    state = load(args.out)
    if args.summary:
        print(summary(state))
        return
    import torch

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    folders = build(args.data, args.datasets)
    meta = state["meta"]
    meta.setdefault("started", date.today().isoformat())
    meta.update(
        machine=machine_info(),
        backbone=f"{BACKBONE} (offline ImageNet)",
        tuning=TUNING,
        held_out=HELD_OUT,
    )
    command = "python benchmarks/recipes.py " + " ".join(sys.argv[1:])
    meta.pop("command", None)
    meta.setdefault("commands", []).extend([] if command in meta["commands"] else [command])
    meta.setdefault("datasets", {}).update({d: json.loads((folders[d] / "dataset.json").read_text()) for d in folders})
    began = time.perf_counter()
    stages = ["screen", "confirm"] if args.stage == "all" else [args.stage]
    for stage in stages:
        plan = (
            screen_plan(args.datasets, folders)
            if stage == "screen"
            else study_plan(args.datasets, folders, args.variants)
        )
        if stage == "confirm":
            plan = confirm_plan(args.datasets, folders, state["runs"], args.top, args.variants)
        for st, dataset, variant, seed, px, epochs in plan:
            k = key(st, dataset, variant, seed, px)
            state["runs"] = {**load(args.out)["runs"], **state["runs"]}  # what other processes finished
            if k in state["runs"] or (args.variants and variant not in args.variants):
                continue
            if time.perf_counter() - began > 60 * args.budget_minutes:
                print(f"budget of {args.budget_minutes} min spent; rerun to continue", flush=True)
                save(args.out, state)
                print(summary(state))
                return
            print(f"== {k} ({epochs} epochs)", flush=True)
            if variant == "peft":
                result = run_peft(folders[dataset], seed, px, PLAIN_EPOCHS)
            else:
                result = run_cli(folders[dataset], variant, seed, px, epochs, args.work)
            state["runs"][k] = result
            meta["updated"] = date.today().isoformat()
            save(args.out, state)
            print(f"   {result}", flush=True)
    print(summary(state))


if __name__ == "__main__":
    main()
