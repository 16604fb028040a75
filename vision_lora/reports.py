"""What a run shows: the training curves, a row-normalised confusion matrix and the most confidently wrong images.

Two callbacks gather the data, the functions below draw it:
- `History` keeps one row per epoch (losses, accuracies, learning rates) in its checkpoint state, so the curves of a
  resumed run start at epoch 0 whatever the logger.
- `EvalPredictions` keeps every prediction of a `validate` or `test` run (not of the validation inside `fit`), gathered
  across ranks: sample key (the file path where the dataset has one), true class, predicted class, score, and the
  input images of the most confidently wrong ones.
`write_reports` turns them into `curves.png`, `confusion_matrix.png` / `.csv` and `errors.png` / `.csv`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import IterableDataset

__all__ = [
    "EvalPredictions",
    "History",
    "Predictions",
    "confusion_figure",
    "curves_figure",
    "plot_confusion_matrix",
    "plot_curves",
    "shorten",
    "write_errors",
    "write_reports",
]

_TOP_WRONG = 16  # images shown in errors.png
_CELL_TEXT_MAX = 40  # classes up to which the confusion matrix prints its cells


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shorten(name: str, width: int = 18) -> str:
    """`name`, cut to `width` characters with an ellipsis where longer."""
    return name if len(name) <= width else name[: width - 1] + "…"


# -- history and curves ------------------------------------------------------------------------------------------

_CURVE_KEYS = ("train_loss_epoch", "val_loss", "val_acc", "val_acc5", "val_balanced_acc", "val_f1")


class History(L.Callback):
    """One row per training epoch: `epoch`, the epoch means of the losses and validation metrics, and `lr` (the
    learning rate of each optimizer parameter group at the end of the epoch). Saved in checkpoints."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._validated = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so the val metrics are this epoch's (when it ran:
        # with check_val_every_n_epoch > 1 they would be an older epoch's).
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for key in _CURVE_KEYS:
            if key in metrics and (self._validated or not key.startswith("val_")):
                row[key] = float(metrics[key])
        self._validated = False
        if trainer.optimizers:
            row["lr"] = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]
        self.epochs = [r for r in self.epochs if r["epoch"] < row["epoch"]] + [row]

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(r) for r in self.epochs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = [dict(r) for r in state_dict.get("epochs", [])]


def best_epoch(epochs: list[dict[str, Any]], monitor: str = "val_acc", mode: str = "max") -> int | None:
    """The epoch with the best `monitor` value (the first of equals, as ModelCheckpoint keeps it); None without one."""
    scored = [(r[monitor], r["epoch"]) for r in epochs if r.get(monitor) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    value = pick(v for v, _ in scored)
    return min(e for v, e in scored if v == value)


def plot_curves(epochs: list[dict[str, Any]], path: str | Path, monitor: str = "val_acc", mode: str = "max") -> Path:
    """Save `curves_figure` as a PNG whose Title is "best epoch N"."""
    return _save(curves_figure(epochs, monitor, mode), path, f"best epoch {best_epoch(epochs, monitor, mode)}")


def _save(fig, path: str | Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title})
    _pyplot().close(fig)
    return path


def curves_figure(epochs: list[dict[str, Any]], monitor: str = "val_acc", mode: str = "max"):
    """Loss, accuracy and learning rate per epoch (three panels sharing the epoch axis), the best epoch marked with a
    dashed line and a star. Readable from 1 to hundreds of epochs: markers only on short runs, at most 11 epoch ticks.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    x = [r["epoch"] for r in epochs]
    best = best_epoch(epochs, monitor, mode)
    marker = "o" if len(x) <= 30 else None
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(
        3, 1, figsize=(7, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.6]}
    )

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    for key, label in (("train_loss_epoch", "train loss"), ("val_loss", "val loss")):
        ex, ey = series(key)
        if ex:
            loss_ax.plot(ex, ey, marker=marker, markersize=4, label=label)
    loss_ax.set_ylabel("loss")
    for key, label in (("val_acc", "val top-1"), ("val_acc5", "val top-5"), ("val_balanced_acc", "val balanced")):
        ex, ey = series(key)
        if ex:
            acc_ax.plot(ex, ey, marker=marker, markersize=4, label=label)
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(top=1.02)
    lrs = [(r["epoch"], r["lr"]) for r in epochs if r.get("lr")]
    for g in range(max((len(v) for _, v in lrs), default=0)):
        ex = [e for e, v in lrs if len(v) > g]
        lr_ax.plot(ex, [v[g] for _, v in lrs if len(v) > g], marker=marker, markersize=3, label=f"group {g}")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.set_xlabel("epoch")
    if len(x) <= 10:
        lr_ax.set_xticks(x)
    else:
        lr_ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    if best is not None:
        row = next(r for r in epochs if r["epoch"] == best)
        for ax in (loss_ax, acc_ax, lr_ax):
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1)
        on_acc = monitor in ("val_acc", "val_acc5", "val_balanced_acc")
        label = f"best: epoch {best}, {monitor} {row[monitor]:.4f}"
        (acc_ax if on_acc else loss_ax).plot([best], [row[monitor]], "*", markersize=14, color="tab:red", label=label)
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if len(x) == 1:
        lr_ax.set_xlim(x[0] - 0.5, x[0] + 0.5)
    fig.suptitle(f"{len(x)} epoch{'s' if len(x) != 1 else ''}" + (f", best epoch {best}" if best is not None else ""))
    fig.tight_layout()
    return fig


# -- predictions -------------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Every prediction of one evaluation pass, in dataset order.

    Attributes:
        stage: "val" or "test".
        keys: per sample, its file path, or its dataset index where the dataset has no paths.
        targets, preds: (N,) class indices; multi-label: (N, C) 0 / 1, the predictions at `thresholds`.
        scores: (N,) softmax probability of the predicted class; multi-label: (N, C) sigmoid probabilities.
        images: the input images (H, W, 3 uint8) of the most confidently wrong samples, by position in `keys`.
        thresholds: (C,) the per-class thresholds of a multi-label model; None for single-label.
        inputs: the network inputs (3, H, W float32, normalised) of the samples in `images`, for Grad-CAM.
        cam_note: what the Grad-CAM overlays on `images` show (`reports_cam.add_cams`); None without overlays.
    """

    stage: str
    keys: list[str]
    targets: np.ndarray
    preds: np.ndarray
    scores: np.ndarray
    images: dict[int, np.ndarray] = field(default_factory=dict)
    thresholds: np.ndarray | None = None
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    cam_note: str | None = None

    def confusion_matrix(self, num_classes: int) -> np.ndarray:
        """(true, predicted) counts."""
        flat = self.targets.astype(np.int64) * num_classes + self.preds.astype(np.int64)
        return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _sample_keys(trainer: L.Trainer, dataloader_idx: int, stage: str) -> tuple[list[int] | None, Any, int]:
    """The dataset indices this rank evaluates, in batch order (None for a streaming dataset, which has no
    sampler), the dataset, and the batch size."""
    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    if isinstance(loader.dataset, IterableDataset):
        return None, loader.dataset, loader.batch_size or 1
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    indices = [int(i[0]) if isinstance(i, (tuple, list)) else int(i) for i in sampler]
    return indices, loader.dataset, loader.batch_size or 1


def _to_uint8(image: Tensor, mean: Any, std: Any) -> np.ndarray:
    """(3, H, W) normalised input -> (H, W, 3) uint8, as the model saw it."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class EvalPredictions(L.Callback):
    """Keeps every prediction of a `trainer.validate` or `trainer.test` run in `self.predictions` (a `Predictions`,
    the same on every rank under DDP). The validation loops inside `fit` are not kept.

    A sample's key is the name the DataModule gives it (`batch_keys`: its path, or its key in an optimized
    dataset); with another DataModule, `dataset.paths[i]` in the order of the loader's sampler, else its index, and
    "rank R batch B item J" for a streaming dataset. The model's eval step must return the logits.
    """

    def __init__(self) -> None:
        self.predictions: Predictions | None = None
        self._rows: list[tuple[Any, int, int, float]] = []  # (sample index or unknown key, true, predicted, score)
        self._images: list[tuple[float, Any, np.ndarray, np.ndarray]] = []  # (score, index, shown, network input)
        self._order: list[int] | None = None
        self._dataset: Any = None
        self._batch_size = 1

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking

    def _start(self, trainer: L.Trainer, stage: str) -> None:
        self.predictions = None
        self._thresholds = None
        self._rows, self._images = [], []
        self._order, self._dataset, self._batch_size = _sample_keys(trainer, 0, stage)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._start(trainer, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "test")

    def _keep(self, pl_module: L.LightningModule, logits: Tensor | None, batch: Any, batch_idx: int) -> None:
        images, targets = batch[0], batch[1]
        if logits is None or not len(images):
            return
        start = batch_idx * self._batch_size
        # A batch shorter than its slice of the sampler lost unreadable files: which ones is not known here, so its
        # samples get no key rather than a wrong one.
        whole = self._order is not None and len(images) == min(self._batch_size, len(self._order) - start)
        thresholds = getattr(pl_module, "thresholds", None) if getattr(pl_module, "task", "") == "multilabel" else None
        if thresholds is not None:  # rows of (target, probabilities); an error's score is its most confident mistake
            self._thresholds = thresholds.detach().float().cpu()
            probs = logits.detach().float().sigmoid().cpu()  # (B, C)
            wrong = (probs >= self._thresholds) != (targets.cpu() > 0.5)  # (B, C)
            confidence = torch.where(targets.cpu() > 0.5, 1 - probs, probs)  # (B, C) how sure each mistake was
            scores = torch.where(wrong, confidence, torch.zeros_like(probs)).max(-1).values
            targets, preds = targets.cpu().long(), probs
            mistaken = wrong.any(-1).tolist()
        else:
            probs = logits.detach().float().softmax(-1)
            scores, preds = probs.max(-1)
            mistaken = None
        config = getattr(pl_module, "data_config", None)  # without one, the images are shown as they come
        mean, std = (config["mean"], config["std"]) if config else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        # vision_lora's DataModule names the samples of the batch (paths, or keys of an optimized dataset).
        named = getattr(getattr(pl_module.trainer, "datamodule", None), "batch_keys", None)
        named = named if named is not None and len(named) == len(images) else None
        for j, (t, p, s) in enumerate(zip(targets.tolist(), preds.tolist(), scores.tolist(), strict=True)):
            if named is not None:
                index = named[j]
            else:
                index = self._order[start + j] if whole else (pl_module.global_rank, batch_idx, j)
            self._rows.append((index, t, p, s))
            is_wrong = t != p if mistaken is None else mistaken[j]
            if is_wrong and (len(self._images) < _TOP_WRONG or s > self._images[0][0]):
                kept = images[j].detach().float().cpu().clone().numpy()  # not a view that would keep the batch
                self._images.append((s, index, _to_uint8(images[j], mean, std), kept))
                self._images.sort(key=lambda item: item[0])
                self._images = self._images[-_TOP_WRONG:]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer) and dataloader_idx == 0:
            self._keep(pl_module, outputs, batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 0:
            self._keep(pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._finish("val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        mine = (self._rows, [(i, pair) for _, i, *pair in self._images])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        by_index: dict[Any, tuple[int, int, float]] = {}
        images: dict[Any, list[np.ndarray]] = {}  # index -> [shown, network input]
        for rows, imgs in everyone:
            for index, t, p, s in rows:
                by_index.setdefault(index, (t, p, s))  # DDP pads the last shard with repeated samples
            images.update(imgs)
        order = sorted(by_index, key=lambda i: (1, i) if isinstance(i, tuple) else (0, (i,)))
        paths = getattr(self._dataset, "paths", None)

        def key(i: str | int | tuple[int, int, int]) -> str:
            if isinstance(i, str):
                return i
            if isinstance(i, tuple):
                why = "" if self._order is None else " (its batch had unreadable files)"
                return f"rank {i[0]} batch {i[1]} item {i[2]}{why}"
            return str(paths[i]) if paths is not None else str(i)

        thresholds = getattr(self, "_thresholds", None)
        preds = np.array([by_index[i][1] for i in order], dtype=np.float64 if thresholds is not None else np.int64)
        scores = np.array([by_index[i][2] for i in order], dtype=np.float64)
        if thresholds is not None:  # multi-label: scores are the probabilities, preds the calls at the thresholds
            thresholds = thresholds.numpy()
            scores, preds = preds, (preds >= thresholds).astype(np.int64)
        self.predictions = Predictions(
            stage=stage,
            keys=[key(i) for i in order],
            targets=np.array([by_index[i][0] for i in order], dtype=np.int64),
            preds=preds,
            scores=scores,
            images={pos: images[i][0] for pos, i in enumerate(order) if i in images},
            thresholds=thresholds,
            inputs={pos: images[i][1] for pos, i in enumerate(order) if i in images},
        )
        self._rows, self._images = [], []


# -- confusion matrix and errors ---------------------------------------------------------------------------------


def accuracy_and_macro_f1(matrix: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy and macro F1 (over the classes that occur as truth or prediction, as torchmetrics does)."""
    total = matrix.sum()
    tp = np.diag(matrix).astype(np.float64)
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    accuracy = float(tp.sum() / total) if total else 0.0
    return min(accuracy, 1.0), min(float(f1[present].mean()) if present.any() else 0.0, 1.0)


def confusion_title(matrix: np.ndarray, stage: str) -> str:
    accuracy, f1 = accuracy_and_macro_f1(matrix)
    return f"{stage}: accuracy {accuracy:.4f}, macro F1 {f1:.4f} ({int(matrix.sum())} images)"


def write_confusion_csv(matrix: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Counts, one row per true class, one column per predicted class."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix.tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Save `confusion_figure` as a PNG; `title` is also the PNG's Title."""
    return _save(confusion_figure(matrix, class_names, title), path, title)


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str):
    """Row-normalised confusion matrix (each true class sums to 1), shortened class names on both axes, the share in
    each cell (white on dark cells) up to 40 classes; beyond that colours only."""
    plt = _pyplot()
    n = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    size = min(max(5.0, 0.32 * n + 2.5), 26.0)
    label_size = 9 if n <= 30 else max(3.5, 9 - n / 20)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    names = [shorten(name) for name in class_names]
    ax.set_xticks(range(n), names, rotation=90, fontsize=label_size)
    ax.set_yticks(range(n), names, fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= _CELL_TEXT_MAX:
        cell_size = 8 if n <= 15 else 6
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=cell_size, color=colour)
    ax.set_title(title, fontsize=max(10.0, size * 0.6))
    fig.tight_layout()
    return fig


def image_grid(plt, count: int, row_height: float):
    """A figure of up to 4 image panels per row for `count` images, axes off: (figure, (rows, cols) axes)."""
    cols = min(4, max(count, 1))
    rows = max(math.ceil(count / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, row_height * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def write_errors(
    predictions: Predictions, class_names: list[str], csv_path: str | Path, png_path: str | Path
) -> tuple[Path, Path]:
    """`errors.csv`: every wrong prediction (key, true, predicted, score), most confident first; `errors.png`: the
    images of the most confident ones with their true and predicted labels."""
    plt = _pyplot()
    csv_path, png_path = Path(csv_path), Path(png_path)
    wrong = np.flatnonzero(predictions.targets != predictions.preds)
    wrong = wrong[np.argsort(-predictions.scores[wrong], kind="stable")]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "score"])
        for i in wrong:
            t, p = class_names[predictions.targets[i]], class_names[predictions.preds[i]]
            writer.writerow([predictions.keys[i], t, p, f"{predictions.scores[i]:.4f}"])
    shown = [i for i in wrong if i in predictions.images][:_TOP_WRONG]
    fig, axes = image_grid(plt, len(shown), 2.9)
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(predictions.images[i])
        true, pred = shorten(class_names[predictions.targets[i]], 16), shorten(class_names[predictions.preds[i]], 16)
        ax.set_title(f"true: {true}\npred: {pred} ({predictions.scores[i]:.2f})", fontsize=8, color="tab:red")
    total = len(predictions.keys)
    if shown:
        heading = f"{predictions.stage}: {len(wrong)} of {total} wrong; the {len(shown)} most confident"
    else:
        heading = f"{predictions.stage}: no wrong predictions among {total} images"
        axes.flat[0].text(0.5, 0.5, "no wrong predictions", ha="center", va="center", fontsize=11)
    heading += f"; {predictions.cam_note}" if shown and predictions.cam_note else ""
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return csv_path, _save(fig, png_path, heading)


def write_reports(
    out_dir: str | Path,
    class_names: list[str],
    predictions: Predictions | None = None,
    history: list[dict[str, Any]] | None = None,
    monitor: str = "val_acc",
    mode: str = "max",
) -> list[Path]:
    """Write what a run shows into `out_dir`; returns the files written.

    Args:
        out_dir: the run (or test) directory.
        class_names: label of each class index.
        predictions: an evaluation pass (`EvalPredictions.predictions`): confusion matrix and errors.
        history: `History.epochs`: curves.png.
        monitor: the metric checkpoints are chosen by, marked on the curves.
        mode: "max" or "min" for `monitor`.
    """
    out = Path(out_dir)
    written: list[Path] = []
    if history:
        written.append(plot_curves(history, out / "curves.png", monitor, mode))
    if predictions is not None and len(predictions.keys) and predictions.thresholds is not None:
        from .reports_multilabel import write_multilabel_reports

        written.extend(write_multilabel_reports(predictions, class_names, out))
    elif predictions is not None and len(predictions.keys):
        matrix = predictions.confusion_matrix(len(class_names))
        title = confusion_title(matrix, predictions.stage)
        written.append(plot_confusion_matrix(matrix, class_names, out / "confusion_matrix.png", title))
        written.append(write_confusion_csv(matrix, class_names, out / "confusion_matrix.csv"))
        written.extend(write_errors(predictions, class_names, out / "errors.csv", out / "errors.png")[::-1])
    return written
