from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST
from PIL import Image

from vision_lora.cli import main
from vision_lora.reports import (
    History,
    Predictions,
    accuracy_and_macro_f1,
    confusion_figure,
    curves_figure,
    plot_confusion_matrix,
    plot_curves,
    write_errors,
)
from vision_lora.runs import resolve_checkpoint


def _png(path: Path, min_size: tuple[int, int] = (300, 300)) -> Image.Image:
    """The PNG at `path`, checked to be at least `min_size` and not blank."""
    image = Image.open(path)
    assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank"
    return image


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _history(epochs: int, best: int) -> list[dict]:
    rows = []
    for e in range(epochs):
        acc = 0.5 + 0.4 * (1 - math.exp(-e / 30)) - (0.1 if e != best else -0.2) * (e > 10)
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * e / epochs))
        rows.append(
            {"epoch": e, "train_loss_epoch": 2 * math.exp(-e / 50), "val_loss": 2.1 * math.exp(-e / 60),
             "val_acc": acc, "val_acc5": min(acc + 0.2, 1.0), "lr": [lr, 10 * lr]}
        )  # fmt: skip
    return rows


@pytest.mark.parametrize("epochs", [1, 300])
def test_curves_mark_the_best_epoch_with_a_bounded_number_of_ticks(epochs, tmp_path):
    best = 0 if epochs == 1 else 137
    history = _history(epochs, best)
    fig = curves_figure(history)
    loss_ax, acc_ax, lr_ax = fig.axes[:3]
    low, high = lr_ax.get_xlim()
    ticks = [t for t in lr_ax.get_xticks() if low <= t <= high]
    assert 1 <= len(ticks) <= 11 and all(t == int(t) for t in ticks)
    stars = [line for line in acc_ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [best]
    assert stars[0].get_ydata()[0] == pytest.approx(history[best]["val_acc"])
    assert f"best: epoch {best}" in stars[0].get_label()
    assert {line.get_label() for line in acc_ax.get_lines()} >= {"val top-1", "val top-5"}
    assert len([line for line in lr_ax.get_lines() if line.get_label().startswith("group")]) == 2
    path = plot_curves(history, tmp_path / "curves.png")
    assert _png(path).text["Title"] == f"best epoch {best}"


def test_history_survives_a_checkpoint_round_trip():
    history = History()
    history.epochs = _history(3, 1)
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    restored = History()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.epochs == history.epochs


def test_confusion_matrix_is_row_normalised_with_white_text_on_dark_cells(tmp_path):
    names = ["cat", "dog", "a rather long class name that goes on"]
    matrix = np.array([[8, 2, 0], [1, 9, 0], [0, 3, 1]])
    accuracy, f1 = accuracy_and_macro_f1(matrix)
    assert accuracy == pytest.approx(18 / 24)
    fig = confusion_figure(matrix, names, "t")
    ax = fig.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert cells[(0, 0)].get_text() == "0.80" and cells[(0, 0)].get_color() == "white"
    assert cells[(2, 1)].get_text() == "0.75" and cells[(2, 1)].get_color() == "white"
    assert cells[(0, 1)].get_text() == "0.20" and cells[(0, 1)].get_color() == "black"
    assert (1, 2) not in cells  # empty cells stay empty
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["cat", "dog"] and labels[2].endswith("…") and len(labels[2]) <= 18
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(image.sum(1), 1.0)
    path = plot_confusion_matrix(matrix, names, tmp_path / "cm.png", "val: accuracy 0.7500")
    assert _png(path).text["Title"] == "val: accuracy 0.7500"


def test_150_classes_render_as_colours_without_cell_text(tmp_path):
    rng = np.random.default_rng(0)
    n = 150
    names = [f"class number {i} of a big dataset" for i in range(n)]
    matrix = np.diag(rng.integers(5, 20, n)) + rng.integers(0, 2, (n, n))
    fig = confusion_figure(matrix, names, "150")
    assert not fig.axes[0].texts
    assert all(len(t.get_text()) <= 18 for t in fig.axes[0].get_xticklabels())
    _png(plot_confusion_matrix(matrix, names, tmp_path / "cm.png", "150 classes"), (1500, 1500))


def test_errors_list_every_wrong_prediction_most_confident_first(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    targets, preds = rng.integers(0, 3, n), rng.integers(0, 3, n)
    scores = rng.uniform(0.34, 1.0, n)
    wrong = np.flatnonzero(targets != preds)
    images = {int(i): rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in wrong}
    predictions = Predictions("val", [f"img{i}.png" for i in range(n)], targets, preds, scores, images)
    csv_path, png_path = write_errors(predictions, ["a", "b", "c"], tmp_path / "errors.csv", tmp_path / "errors.png")
    rows = _rows(csv_path)
    assert sorted(r["path"] for r in rows) == sorted(f"img{i}.png" for i in wrong)
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert all(r["true"] != r["predicted"] for r in rows)
    assert "16 most confident" in _png(png_path).text["Title"]
    # Nothing wrong: an empty list and a picture that says so.
    right = Predictions("test", ["x"], np.array([1]), np.array([1]), np.array([0.9]))
    csv_path, png_path = write_errors(right, ["a", "b"], tmp_path / "none.csv", tmp_path / "none.png")
    assert _rows(csv_path) == [] and "no wrong predictions" in Image.open(png_path).text["Title"]


def _touch_checkpoint(path: Path, mtime: float, best: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    callbacks = {}
    if best is not None:
        callbacks["ModelCheckpoint{'monitor': 'val_acc'}"] = {"monitor": "val_acc", "best_model_path": best}
    torch.save({"callbacks": callbacks}, path)
    os.utime(path, (mtime, mtime))


def test_ckpt_path_best_and_last_pick_the_newest_run_and_refuse_overlapping_runs(tmp_path):
    root = tmp_path / "runs" / "quickstart"
    old, new = root / "version_0" / "checkpoints", root / "version_1" / "checkpoints"
    _touch_checkpoint(old / "best-epoch=00-val_acc=0.5000.ckpt", 1000)
    _touch_checkpoint(old / "last.ckpt", 1100, best="elsewhere/best-epoch=00-val_acc=0.5000.ckpt")
    _touch_checkpoint(new / "best-epoch=01-val_acc=0.9000.ckpt", 2000)
    _touch_checkpoint(new / "best-epoch=02-val_acc=0.8000.ckpt", 2050)
    _touch_checkpoint(new / "last.ckpt", 2100, best="/moved/best-epoch=01-val_acc=0.9000.ckpt")
    assert resolve_checkpoint("best", root) == new / "best-epoch=01-val_acc=0.9000.ckpt"
    assert resolve_checkpoint("last", root) == new / "last.ckpt"
    assert resolve_checkpoint("best", root / "version_0") == old / "best-epoch=00-val_acc=0.5000.ckpt"  # one run
    # A run written at the same time as the newest one: which is meant is unclear.
    _touch_checkpoint(root / "version_2" / "checkpoints" / "last.ckpt", 2080, best=None)
    with pytest.raises(ValueError, match="at the same time") as info:
        resolve_checkpoint("last", root)
    assert "version_1" in str(info.value) and "version_2" in str(info.value)
    with pytest.raises(ValueError, match="Runs elsewhere: .*quickstart/version_0"):
        resolve_checkpoint("best", tmp_path / "runs" / "lightning_logs")


def _console(capfd, caplog) -> str:
    """What a user would see: printed lines and Lightning's log lines (which pytest takes before they reach a fd)."""
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    caplog.clear()
    return text


_RATE = re.compile(r"(?:val|test)_(?:acc\w*|balanced_acc|f1)\D{1,40}?([0-9]+\.[0-9]+)")


def test_fit_then_test_show_their_pictures_and_a_clean_console(image_folder, tmp_path, monkeypatch, capfd, caplog):
    """A barely trained model (many errors): curves, confusion matrix and errors after fit (validation split) and
    after test (test split, in the run's test/ folder); plain progress lines, no tip line, no rate above 1."""
    monkeypatch.chdir(tmp_path)
    weak = ["--model.lr=0.0", "--model.head_lr=0.002", "--trainer.enable_progress_bar=true", "--seed_everything=0"]
    main(["fit", *FAST, *weak, f"--data.root={image_folder}", "--trainer.max_epochs=2"])
    fit_out = _console(capfd, caplog)
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    metrics = _rows(run / "metrics.csv")
    val_acc = {int(r["epoch"]): float(r["val_acc"]) for r in metrics if r.get("val_acc")}
    best = max(val_acc, key=lambda e: (val_acc[e], -e))
    assert _png(run / "curves.png").text["Title"] == f"best epoch {best}"
    title = _png(run / "confusion_matrix.png").text["Title"]
    assert title.startswith(f"val: accuracy {val_acc[best]:.4f}") and "(12 images)" in title
    errors = _rows(run / "errors.csv")
    assert len(errors) == round((1 - val_acc[best]) * 12) > 0
    assert all(Path(r["path"]).is_file() and Path(r["path"]).parent.name == r["true"] for r in errors)
    assert [float(r["score"]) for r in errors] == sorted((float(r["score"]) for r in errors), reverse=True)
    assert _png(run / "errors.png", (200, 200)).text["Title"].endswith("; Grad-CAM of the predicted class")
    for name in ("curves.png", "confusion_matrix.png", "confusion_matrix.csv", "errors.png", "errors.csv"):
        assert f"Wrote runs/lightning_logs/version_0/{name}" in fit_out
    assert re.search(r"epoch 2/2  step 5/5  loss \d\.\d{4}  [\d.]+ images/s  ETA 0:00:00", fit_out)

    fit_files = {name: (run / name).read_bytes() for name in ("metrics.csv", "config.yaml", "hparams.yaml")}
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best", "--trainer.enable_progress_bar=true"])
    test_out = _console(capfd, caplog)
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no new version folder
    assert {name: (run / name).read_bytes() for name in fit_files} == fit_files  # the fit's files untouched
    test_acc = float(next(r["test_acc"] for r in _rows(run / "test" / "metrics.csv") if r.get("test_acc")))
    assert _png(run / "test" / "confusion_matrix.png").text["Title"].startswith(f"test: accuracy {test_acc:.4f}")
    assert len(_rows(run / "test" / "errors.csv")) == round((1 - test_acc) * 12)
    assert f"Wrote {run}/test/errors.csv" in test_out  # the --config given was absolute

    main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--output_dir", "elsewhere"])
    assert _png(tmp_path / "elsewhere" / "confusion_matrix.png").text["Title"].startswith("val: accuracy")
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]

    console = fit_out + test_out
    assert "Tip:" not in console and "litlogger" not in console and "litmodels" not in console
    rates = [float(v) for v in _RATE.findall(console)]
    assert len(rates) > 5 and max(rates) <= 1.0


def test_an_unreadable_validation_file_leaves_the_other_keys_right(tmp_path, monkeypatch):
    """The batch that lost a file still names each of its other images right (the DataModule's batch keys)."""
    from conftest import make_image_folder

    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "data", {"train": 12, "val": 8})
    (root / "val" / "blue ünïcode" / "3.png").write_bytes(b"not a png")  # in the first batch of 8
    weak = ["--model.lr=0.0", "--model.head_lr=0.002", "--data.max_bad_fraction=0.2", "--seed_everything=0"]
    main(["fit", *FAST, *weak, f"--data.root={root}", "--trainer.max_epochs=1"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    with open(run / "confusion_matrix.csv", newline="", encoding="utf-8") as f:
        assert sum(int(v) for row in list(csv.reader(f))[1:] for v in row[1:]) == 23
    errors = _rows(run / "errors.csv")
    assert errors and all(Path(r["path"]).is_file() and Path(r["path"]).parent.name == r["true"] for r in errors)
    assert not any(r["path"].endswith("3.png") and "blue" in r["path"] for r in errors)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for i in range(10):
            yield torch.randn(3, 32, 32, generator=generator), i % 3


class _Files(torch.utils.data.Dataset):
    paths = [f"img{i}.png" for i in range(10)]

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((3, 32, 32), float(i) / 10), i % 3


@pytest.mark.parametrize("dataset", [_Files(), _Stream()], ids=["paths", "streaming"])
def test_eval_predictions_keeps_every_sample_of_a_plain_lightning_validate(dataset):
    from helpers import quiet_trainer

    from vision_lora import LoRAClassifier
    from vision_lora.reports import EvalPredictions

    module = LoRAClassifier("test_resnet", num_classes=3)
    gather = EvalPredictions()
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    quiet_trainer(callbacks=[gather]).validate(module, loader, verbose=False)
    predictions = gather.predictions
    assert predictions.stage == "val" and len(predictions.keys) == 10
    assert predictions.targets.tolist() == [i % 3 for i in range(10)]
    if isinstance(dataset, _Files):
        assert predictions.keys == _Files.paths
    else:
        assert predictions.keys[:5] == [f"rank 0 batch {i // 4} item {i % 4}" for i in range(5)]
    wrong = predictions.targets != predictions.preds
    assert set(predictions.images) == set(np.flatnonzero(wrong).tolist())
