"""Does the Grad-CAM map point at the evidence? Synthetic images whose class is a textured patch (a quarter of the side)
at a random place on a colour-noise background, LoRA-trained through `vision-lora fit`; on held-out images, the share
whose map (for the predicted class, at input resolution, the default layer) peaks inside the patch, and the held-out
accuracy.

    python benchmarks/gradcam_localisation.py --out benchmarks/results/gradcam_localisation.json

Models: `test_vit` (random init, saved to a file as the tests do, so the checkpoint rebuilds the same backbone) and
`tf_efficientnet_lite0` (`--model.weights=offline`), with crop_pct 1 (the eval transform leaves the images as drawn, so
the patch boxes are in input pixels), `--recipe=off`, a fixed number of epochs; `--vit_args` / `--lite0_args` add fit
arguments (LoRA targets, rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402

from vision_lora.checkpoint import load_model  # noqa: E402
from vision_lora.cli import main as cli  # noqa: E402
from vision_lora.data.folder import preprocess_files  # noqa: E402
from vision_lora.explain import cam_layer, grad_cam  # noqa: E402

CLASSES = ("red", "checker", "hstripes", "vstripes")
NEAR = 16  # px: half a cell of a stride-32 map (Lite0's last stage), one patch of test_vit


def patch(kind: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the evidence of class `kind`."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "red":
        return np.broadcast_to(np.array([230, 20, 20], np.uint8), (size, size, 3)).copy()
    if kind == "checker":
        on = ((yy // 5 + xx // 5) % 2).astype(bool)
    elif kind == "hstripes":
        on = (yy // 4) % 2 == 0
    else:
        on = (xx // 4) % 2 == 0
    colour = {"checker": (255, 255, 255), "hstripes": (20, 220, 20), "vstripes": (30, 30, 240)}[kind]
    out = np.zeros((size, size, 3), np.uint8)
    out[on] = colour
    return out


def draw(folder: Path, count: int, rng: np.random.Generator, side: int, balanced: bool = True) -> list[dict]:
    """`count` images per class (or `count` in all, random classes) under `folder/<class>/`, each a patch of a quarter
    of `side` on colour noise; their patch boxes."""
    classes = [c for c in CLASSES for _ in range(count)] if balanced else list(rng.choice(CLASSES, count))
    size = side // 4
    boxes = []
    for i, kind in enumerate(classes):
        image = rng.integers(40, 200, (side, side, 3), dtype=np.uint8)
        y, x = (int(v) for v in rng.integers(0, side - size + 1, 2))
        image[y : y + size, x : x + size] = patch(kind, size)
        path = folder / kind / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        boxes.append({"path": str(path), "class": str(kind), "y": y, "x": x, "size": size})
    return boxes


def localisation(maps: torch.Tensor, boxes: list[dict]) -> dict:
    """Where the maps (N, H, W) peak against the patch boxes: inside, within `NEAR` px, the share of the map's mass
    inside the patch (a uniform map: 1/16), per class too."""
    width = maps.shape[-1]
    peaks = maps.flatten(1).argmax(1).tolist()  # (N,)
    rows = []
    for cam, peak, box in zip(maps, peaks, boxes, strict=True):
        py, px = divmod(peak, width)
        y, x, size = box["y"], box["x"], box["size"]
        distance = max(y - py, 0, py - (y + size - 1), x - px, 0, px - (x + size - 1))  # px, 0 inside
        mass = float(cam[y : y + size, x : x + size].sum() / cam.sum().clamp(min=1e-12))
        rows.append((box["class"], distance, mass))

    def share(selected: list[tuple[str, int, float]]) -> float:
        return round(sum(d == 0 for _, d, _ in selected) / max(len(selected), 1), 3)

    return {
        "peak_inside_patch": share(rows),
        f"peak_within_{NEAR}px_of_patch": round(sum(d <= NEAR for _, d, _ in rows) / len(rows), 3),
        "map_mass_inside_patch_mean": round(float(np.mean([m for _, _, m in rows])), 3),
        "peak_inside_patch_per_class": {c: share([r for r in rows if r[0] == c]) for c in CLASSES},
        "images_per_class": {c: sum(r[0] == c for r in rows) for c in CLASSES},
    }


def occlusion(model: torch.nn.Module, batch: torch.Tensor, cell: int) -> torch.Tensor:
    """(N, H, W) how much the predicted class's centred logit (its logit minus the mean logit, the part a softmax
    sees) drops when one `cell` x `cell` square is set to the normalised mean (0): what the model itself relies on,
    without gradients."""
    with torch.no_grad():
        logits = model(batch)
        chosen = logits.argmax(-1, keepdim=True)  # (N, 1)

        def centred(out: torch.Tensor) -> torch.Tensor:
            return out.gather(1, chosen)[:, 0] - out.mean(1)  # (N,)

        base, side = centred(logits), batch.shape[-1]
        drops = torch.zeros(len(batch), side // cell, side // cell)
        for i in range(side // cell):
            for j in range(side // cell):
                hidden = batch.clone()
                hidden[:, :, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = 0
                drops[:, i, j] = base - centred(model(hidden))
    up = torch.nn.functional.interpolate(drops[:, None], size=batch.shape[-2:], mode="bilinear", align_corners=False)
    return up[:, 0]  # (N, H, W), resized as Grad-CAM maps are


def measure(
    model_name: str,
    weights: str,
    epochs: int,
    lr: float,
    side: int,
    data: Path,
    heldout: list[dict],
    extra: list[str],
    layers: list[str] = (),
    occlude: int = 0,
) -> dict:
    """Fit through the CLI, then the held-out accuracy and where the Grad-CAM maps of the predicted class peak, at the
    default layer and at each of `layers` (and, with `occlude`, of occlusion maps of squares of that size)."""
    work = data.parent
    args = [
        "fit",
        f"--model.backbone={model_name}",
        f"--model.weights={weights}",
        f"--model.lr={lr}",
        f"--model.input_size={side}",
        "--model.crop_pct=1.0",
        f"--data.root={data}",
        "--data.batch_size=32",
        "--data.num_workers=0",
        "--data.augment=none",
        "--recipe=off",
        "--seed_everything=0",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={work}",
        f"--trainer.logger.init_args.name={model_name}",
        *extra,
    ]
    start = time.perf_counter()
    cli(args)
    fit_seconds = time.perf_counter() - start
    run = work / model_name / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    trained = load_model(ckpt_path=best)
    batch = preprocess_files([b["path"] for b in heldout], trained.data_config)  # (N, 3, side, side)
    assert batch.shape[-2:] == (side, side), "the eval transform must leave the drawn images as they are"
    model = trained.model.eval()
    with torch.no_grad():
        preds = model(batch).argmax(-1)  # (N,)
    labels = torch.tensor([trained.class_names.index(b["class"]) for b in heldout])  # the folders' sorted order
    start = time.perf_counter()
    maps = grad_cam(model, batch)  # (N, side, side), for the predicted class
    cam_seconds = time.perf_counter() - start
    other = {}
    if occlude:
        found = localisation(occlusion(model, batch, occlude), heldout)
        other[f"occlusion of {occlude} px squares"] = {
            k: found[k] for k in ("peak_inside_patch", "peak_inside_patch_per_class")
        }
    for layer in layers:
        found = localisation(grad_cam(model, batch, layer=layer), heldout)
        other[layer] = {k: found[k] for k in ("peak_inside_patch", f"peak_within_{NEAR}px_of_patch")}
        other[layer]["peak_inside_patch_per_class"] = found["peak_inside_patch_per_class"]
    return {
        "model": model_name,
        "weights": "random init (saved to a file)" if weights.endswith(".pth") else weights,
        "epochs": epochs,
        "lr": lr,
        "extra_fit_args": extra,
        "side": side,
        "patch": side // 4,
        "cam_layer": cam_layer(model)[0],
        "heldout_images": len(heldout),
        "heldout_accuracy": float((preds == labels).float().mean()),
        **localisation(maps, heldout),
        "fit_seconds": round(fit_seconds, 1),
        "cam_seconds_50_images": round(cam_seconds, 2),
        **({"other_layers": other} if other else {}),
        "errors_png_title": Image.open(run / "errors.png").text.get("Title"),
    }


def dataset(work: Path, side: int, train: int, heldout: int) -> tuple[Path, list[dict]]:
    """The image folder (train, val: a fifth of train) and the held-out boxes for images of `side` px (seed 0)."""
    folder = work / f"side_{side}"
    rng = np.random.default_rng(0)
    draw(folder / "data" / "train", train, rng, side)
    draw(folder / "data" / "val", max(train // 5, 2), rng, side)
    return folder / "data", draw(folder / "heldout", heldout, rng, side, balanced=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=80, help="training images per class (val: a fifth of it)")
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--vit_epochs", type=int, default=10)
    parser.add_argument("--vit_lr", type=float, default=3e-3)
    parser.add_argument("--vit_side", type=int, default=224)
    parser.add_argument("--vit_args", action="append", default=[], help="a fit argument for test_vit (repeat)")
    parser.add_argument("--vit_layers", nargs="*", default=[], help="other layers of test_vit to read as well")
    parser.add_argument("--vit_occlusion", type=int, default=0, help="also occlusion maps of test_vit, squares of N px")
    parser.add_argument("--lite0_epochs", type=int, default=4)
    parser.add_argument("--lite0_lr", type=float, default=1e-3)
    parser.add_argument("--lite0_side", type=int, default=224)
    parser.add_argument("--lite0_args", action="append", default=[], help="a fit argument for Lite0 (repeat)")
    parser.add_argument("--models", nargs="+", default=["test_vit", "tf_efficientnet_lite0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the images and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gradcam_localisation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "command": "python benchmarks/gradcam_localisation.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": machine_info(threads=args.threads),
        "images": {"classes": list(CLASSES), "patch": "a quarter of the side", "background": "colour noise 40-199",
                   "train_per_class": args.train, "val_per_class": max(args.train // 5, 2), "seed": 0},
        "runs": [],
    }  # fmt: skip
    args.out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.chdir(work)  # anything the CLI writes relative to the working directory stays in the work folder
        for name in args.models:
            if name == "test_vit":
                data, heldout = dataset(work, args.vit_side, args.train, args.heldout)
                torch.manual_seed(123)
                weights = str(work / "test_vit.pth")
                torch.save(timm.create_model("test_vit").state_dict(), weights)
                settings = (args.vit_epochs, args.vit_lr, args.vit_side, data, heldout, args.vit_args, args.vit_layers)
                row = measure(name, weights, *settings, occlude=args.vit_occlusion)
            else:
                data, heldout = dataset(work, args.lite0_side, args.train, args.heldout)
                row = measure(
                    name, "offline", args.lite0_epochs, args.lite0_lr, args.lite0_side, data, heldout, args.lite0_args
                )
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
