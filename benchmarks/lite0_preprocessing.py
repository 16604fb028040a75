"""Which preprocessing the offline EfficientNet-Lite0 weights want: a linear probe on frozen pooled features, once with
ImageNet mean/std + bilinear (what vision_lora declared before issue 23) and once with mean = std = 0.5 + bicubic
(timm's `tf_efficientnet_lite0` config: the TensorFlow originals take inputs in [-1, 1]).

    python benchmarks/lite0_preprocessing.py --data /tmp/recipe_data --out benchmarks/results/lite0_preprocessing.json

Datasets: data/digits and the recipe-study folders (`recipe_datasets.py`). The probe is scikit-learn's logistic
regression on train features, scored on test; the same features and solver both ways, so the difference is the
preprocessing alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402
from recipe_datasets import build  # noqa: E402

from vision_lora.preprocess import eval_transform  # noqa: E402
from vision_lora.weights import create_backbone  # noqa: E402

CONFIGS = {
    "imagenet_bilinear": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"},
    "half_bicubic": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"},
}


def features(model: torch.nn.Module, folder: Path, config: dict, size: int) -> tuple[torch.Tensor, list[int]]:
    """Pooled features (N, C) and labels of every image under `folder/<class>/`."""
    transform = eval_transform({**config, "input_size": (3, size, size), "crop_pct": 1.0})
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(index)
    with torch.inference_mode():
        out = [model(torch.stack(images[i : i + 64])) for i in range(0, len(images), 64)]
    return torch.cat(out), labels


def probe(model: torch.nn.Module, root: Path, config: dict, size: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = features(model, root / "train", config, size)
    x_test, y_test = features(model, root / "test", config, size)
    scaler = StandardScaler().fit(x_train.numpy())
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x_train.numpy()), y_train)
    return float(clf.score(scaler.transform(x_test.numpy()), y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/recipe_data"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lite0_preprocessing.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = {"digits": REPO / "data/digits", **build(args.data)}
    model = create_backbone("tf_efficientnet_lite0", num_classes=0, weights="offline").eval()
    rows = []
    for name, root in sets.items():
        row = {"dataset": name, **{key: probe(model, root, cfg, args.size) for key, cfg in CONFIGS.items()}}
        row["gain_pt"] = 100 * (row["half_bicubic"] - row["imagenet_bilinear"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    mean_gain = sum(r["gain_pt"] for r in rows) / len(rows)
    print(f"mean gain of mean=std=0.5 + bicubic: {mean_gain:+.1f} pt over {len(rows)} datasets")
    result = {
        "command": "python benchmarks/lite0_preprocessing.py",
        "size": args.size,
        "probe": "logistic regression",
        "rows": rows,
        "mean_gain_pt": mean_gain,
        "machine": machine_info(),
    }
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
