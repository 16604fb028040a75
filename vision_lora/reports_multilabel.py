"""What a multi-label evaluation pass shows: per-class average precision as a bar chart, and the false positives and
false negatives as errors.csv / errors.png."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .multilabel import average_precision
from .reports import Predictions, _pyplot, _save, image_grid, shorten

__all__ = ["plot_class_ap", "write_multilabel_errors", "write_multilabel_reports"]

_TOP_WRONG = 16


def plot_class_ap(predictions: Predictions, class_names: list[str], path: str | Path) -> Path:
    """A bar per class: its average precision on the pass (classes without a positive marked and left out of mAP)."""
    plt = _pyplot()
    ap = average_precision(torch.from_numpy(predictions.scores), torch.from_numpy(predictions.targets)).numpy()
    present = ~np.isnan(ap)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.35 * n + 2.0), 26.0), 4.0))
    ax.bar(range(n), np.where(present, ap, 0.0), color=["tab:blue" if p else "lightgrey" for p in present])
    ax.set_xticks(range(n), [shorten(c) for c in class_names], rotation=90, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("average precision")
    mean = float(ap[present].mean()) if present.any() else float("nan")
    absent = int((~present).sum())
    title = f"{predictions.stage}: mAP {mean:.4f} over {int(present.sum())} classes" + (
        f" ({absent} without a positive, grey)" if absent else ""
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, title)


def write_multilabel_errors(
    predictions: Predictions, class_names: list[str], csv_path: str | Path, png_path: str | Path
) -> tuple[Path, Path]:
    """`errors.csv`: one row per wrong call (path, class, "false positive" / "false negative", probability,
    threshold), most confident first; `errors.png`: the images of the most confidently wrong samples with what was
    missed and what was added."""
    plt = _pyplot()
    csv_path, png_path = Path(csv_path), Path(png_path)
    probs, targets, preds = predictions.scores, predictions.targets, predictions.preds  # (N, C) each
    wrong = np.argwhere(preds != targets)  # (K, 2) sample, class
    confidence = np.where(targets[wrong[:, 0], wrong[:, 1]] == 1, 1 - probs[wrong[:, 0], wrong[:, 1]], 0.0)
    confidence = np.where(targets[wrong[:, 0], wrong[:, 1]] == 0, probs[wrong[:, 0], wrong[:, 1]], confidence)
    wrong = wrong[np.argsort(-confidence, kind="stable")]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "error", "probability", "threshold"])
        for i, c in wrong:
            kind = "false negative" if targets[i, c] == 1 else "false positive"
            threshold = predictions.thresholds[c]
            writer.writerow([predictions.keys[i], class_names[c], kind, f"{probs[i, c]:.4f}", f"{threshold:.4f}"])
    samples = list(dict.fromkeys(int(i) for i, _ in wrong))
    shown = [i for i in samples if i in predictions.images][:_TOP_WRONG]
    fig, axes = image_grid(plt, len(shown), 3.1)
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(predictions.images[i])
        missed = [shorten(class_names[c], 12) for c in np.flatnonzero((targets[i] == 1) & (preds[i] == 0))]
        added = [shorten(class_names[c], 12) for c in np.flatnonzero((targets[i] == 0) & (preds[i] == 1))]
        ax.set_title(
            f"missed: {', '.join(missed) or '-'}\nadded: {', '.join(added) or '-'}", fontsize=7, color="tab:red"
        )
    heading = f"{predictions.stage}: {len(samples)} of {len(predictions.keys)} images with a wrong label"
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no wrong labels", ha="center", va="center", fontsize=11)
    heading += f"; {predictions.cam_note}" if shown and predictions.cam_note else ""
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return csv_path, _save(fig, png_path, heading)


def write_multilabel_reports(predictions: Predictions, class_names: list[str], out_dir: str | Path) -> list[Path]:
    """class_ap.png, errors.png and errors.csv of a multi-label pass in `out_dir`."""
    out = Path(out_dir)
    csv_path, png_path = write_multilabel_errors(predictions, class_names, out / "errors.csv", out / "errors.png")
    return [plot_class_ap(predictions, class_names, out / "class_ap.png"), png_path, csv_path]
