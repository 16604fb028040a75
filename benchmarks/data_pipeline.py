"""Training data pipeline throughput on camera-size photos: torchvision ImageFolder + timm transform (full JPEG
decode) against vision_lora's image folder (reduced-scale decode) and its optimized LitData dataset.

    python benchmarks/data_pipeline.py                    # about 5 minutes on 2 cores
    python benchmarks/data_pipeline.py --accuracy         # also: quickstart test accuracy, folder vs optimized

The photos are scikit-image's sample photos resized to 4000x3000 and saved as JPEG quality 90 in a temporary
folder (nothing is committed). Each mode decodes + applies the timm train transform at 224 px (random-resized
crop, flip, colour jitter), batch 32; modes alternate over rounds so machine drift cancels, images/s is the
median over rounds, ratios are medians of per-round ratios. Writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

# torch, timm, torchvision and vision_lora.data are imported where they are used, so that `--help` (and
# dora_quickstart.py, which imports _test_acc from here) do not wait for them.

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
)
REPO = Path(__file__).resolve().parents[1]


def make_photos(root: Path, per_photo: int) -> None:
    """root/train/<photo>/<i>.jpg: each sample photo at 4000x3000, JPEG quality 90, lightly varied per copy."""
    from skimage import data

    rng = np.random.default_rng(0)
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        base = Image.fromarray(pixels[..., :3]).resize((4000, 3000), Image.Resampling.BICUBIC)
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_photo):
            noise = rng.integers(-6, 7, (3000, 4000, 3), dtype=np.int16)  # so that copies are not identical files
            image = Image.fromarray(np.clip(np.asarray(base, np.int16) + noise, 0, 255).astype(np.uint8))
            image.save(folder / f"{i}.jpg", quality=90)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rate(make_loader, seconds: float = 8.0) -> float:
    """Images per second over whole epochs of a fresh loader, repeated until `seconds` have passed (worker start-up
    included, as in training)."""
    loader = make_loader()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch.images
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def loaders(photos: Path, optimized: Path, workers: int, batch: int) -> dict:
    from timm.data import create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from vision_lora.data import ImageFolderDataModule

    transform = create_transform(input_size=(3, 224, 224), is_training=True, color_jitter=0.4)
    torchvision = ImageFolder(str(photos / "train"), transform=transform)
    common = dict(batch_size=batch, num_workers=workers, persistent_workers=False)

    def ours(root: Path):
        dm = ImageFolderDataModule(root=str(root), model_name="vit_base_patch16_224", **common)
        dm.setup("fit")
        return dm.train_dataloader()

    return {
        "torchvision": lambda: DataLoader(torchvision, batch_size=batch, num_workers=workers, shuffle=True),
        "folder": lambda: ours(photos),
        "optimized": lambda: ours(optimized),
    }


def quickstart_accuracy(optimized: Path, seeds: list[int]) -> dict:
    """Test accuracy of the quickstart recipe trained and tested on the digits folder and on its optimized copy, per
    seed (the two sources shuffle differently, so single runs differ by training noise), and the means."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (source, root) in [
            (s, src) for s in seeds for src in (("folder", REPO / "data" / "digits"), ("optimized", optimized))
        ]:
            name = f"{source}_seed{seed}"
            base = ["--config", str(REPO / "configs" / "quickstart.yaml"), f"--data.root={root}"]
            base += [f"--seed_everything={seed}", f"--data.seed={seed}"]
            log = [f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.logger.init_args.name={name}"]
            cli = [sys.executable, "-m", "vision_lora.cli"]
            subprocess.run([*cli, "fit", *base, *log, "--trainer.enable_progress_bar=false"], check=True, cwd=tmp)
            best = next(Path(tmp, name, "version_0", "checkpoints").glob("best-*.ckpt"))
            result = subprocess.run(
                [*cli, "test", *base, *log, f"--ckpt_path={best}", "--trainer.enable_progress_bar=false"],
                check=True, cwd=tmp, capture_output=True, text=True,
            )  # fmt: skip
            out.setdefault(source, {})[seed] = _test_acc(Path(tmp, name)) or result.stdout[-500:]
    for source in ("folder", "optimized"):
        out[f"{source}_mean"] = statistics.mean(out[source].values())
    out["optimized_minus_folder_pt"] = 100 * (out["optimized_mean"] - out["folder_mean"])
    return out


def _test_acc(run_root: Path) -> float | None:
    """The test accuracy logged under `run_root` (the newest metrics.csv holding one)."""
    import csv

    for metrics in sorted(run_root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime, reverse=True):
        with open(metrics, newline="", encoding="utf-8") as f:
            values = [row["test_acc"] for row in csv.DictReader(f) if row.get("test_acc")]
        if values:
            return float(values[-1])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-photo", type=int, default=6, help="copies of each of the 8 photos (default 6: 48 images)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes in the multi-process rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accuracy", action="store_true", help="also train + test the quickstart on both sources")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the accuracy runs")
    p.add_argument("--skip-throughput", action="store_true", help="only the accuracy runs")
    p.add_argument("--out", default=str(Path(__file__).with_name("results") / "data_pipeline.json"))
    args = p.parse_args()
    import torch

    from vision_lora.data import FolderSource, optimize_folder

    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        photos, optimized = Path(tmp, "photos"), Path(tmp, "optimized")
        if args.skip_throughput:
            args.per_photo = 2  # the photos are not used; two per class make a val split
        make_photos(photos, args.per_photo)
        report = optimize_folder(FolderSource(photos, val_fraction=0.1), optimized, max_side=512)
        n = report.counts["train"]
        results: dict = {
            "images": n,
            "source_mb": folder_bytes(photos) / 1e6,
            "optimized_mb": report.output_bytes / 1e6,
        }
        results["bytes_ratio"] = report.output_bytes / folder_bytes(photos)
        for workers in () if args.skip_throughput else (0, args.workers):  # 0: the main process alone, one core
            build = loaders(photos, optimized, workers, batch=8)
            per_round: dict[str, list[float]] = {k: [] for k in build}
            for _ in range(args.rounds):
                for name, make in build.items():
                    per_round[name].append(rate(make))
            key = "one_core" if workers == 0 else f"{workers}_workers"
            results[key] = {name: statistics.median(v) for name, v in per_round.items()}
            for name in ("folder", "optimized"):
                ratios = [a / b for a, b in zip(per_round[name], per_round["torchvision"], strict=True)]
                results[key][f"{name}/torchvision"] = statistics.median(ratios)
            print(key, json.dumps(results[key], indent=1), flush=True)
        if not args.skip_throughput:
            results["cores_for_2000_img_s"] = {k: 2000 / v for k, v in results["one_core"].items() if "/" not in k}
        if args.accuracy:
            results["quickstart_test_acc"] = quickstart_accuracy(_optimize_digits(Path(tmp)), args.seeds)
    results["meta"] = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", "benchmarks/data_pipeline.py", *sys.argv[1:]]),
        "seconds": round(time.time() - started),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _optimize_digits(tmp: Path) -> Path:
    from vision_lora.data import FolderSource, optimize_folder

    out = tmp / "digits_optimized"
    optimize_folder(FolderSource(REPO / "data" / "digits"), out)
    return out


if __name__ == "__main__":
    main()
