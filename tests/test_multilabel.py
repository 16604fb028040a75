"""Multi-label: the metrics against scikit-learn and brute force, class weights, and a JSONL run end to end (fit,
thresholds in checkpoint / adapter / ONNX, test, predict, int8 with exact label-set agreement)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from vision_lora.cli import main
from vision_lora.deploy.int8 import agree, quantize_int8
from vision_lora.deploy.onnx import read_onnx_metadata
from vision_lora.lora.adapter import read_adapter_config
from vision_lora.multilabel import (
    average_precision,
    choose_thresholds,
    class_weights,
    label_sets,
    multilabel_metrics,
)

_COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def test_average_precision_matches_scikit_learn_and_is_nan_without_positives():
    rng = np.random.default_rng(0)
    scores = rng.random((50, 4))
    targets = (rng.random((50, 4)) < 0.3).astype(np.int64)
    targets[:, 3] = 0
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(3)]
    torch.testing.assert_close(ours[:3], torch.tensor(expected, dtype=torch.float64))
    assert torch.isnan(ours[3])
    tied = np.round(scores * 4) / 4  # tied scores (saturated sigmoids, coarse runtimes): ties count as one step
    ours = average_precision(torch.from_numpy(tied), torch.from_numpy(targets))
    expected = [average_precision_score(targets[:, c], tied[:, c]) for c in range(3)]
    torch.testing.assert_close(ours[:3], torch.tensor(expected, dtype=torch.float64))


def test_thresholds_reach_the_best_f1_of_any_threshold():
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((40, 3)))
    targets = (torch.rand(40, 3, generator=torch.Generator().manual_seed(2)) < probs).double()
    chosen = choose_thresholds(probs, targets)
    for c in range(3):
        best = max(f1_score(targets[:, c], probs[:, c] >= t) for t in probs[:, c].tolist())
        assert f1_score(targets[:, c], probs[:, c] >= chosen[c].item()) == pytest.approx(best)


def test_metrics_at_thresholds_by_hand():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    metrics, absent = multilabel_metrics(probs, targets, torch.tensor([0.5, 0.5]))
    # calls: [1,0], [1,1], [0,0]: tp 2, fp 1, fn 0; class 0 F1 2/3, class 1 F1 1; 2 of 3 rows exact
    assert metrics["f1_micro"] == pytest.approx(4 / 5)
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["map"] == pytest.approx(1.0) and absent == []


def test_class_weights():
    torch.testing.assert_close(class_weights([90, 10], "inverse"), torch.tensor([0.2, 1.8]))
    effective = class_weights([90, 10], "effective")
    assert effective[1] > effective[0] and effective.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(class_weights([90, 10], "auto"), effective)
    torch.testing.assert_close(class_weights([2, 0], "auto", multilabel=True, total=8), torch.tensor([3.0, 1.0]))


def _mosaics(root: Path, count: int, seed: int = 0) -> Path:
    """32 px images with 0 to 3 coloured squares; the label is the set of colours present."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        present = [c for c in _COLOURS if rng.random() < 0.5]
        for c in present:
            y, x = rng.integers(0, 22, 2)
            img[y : y + 10, x : x + 10] = _COLOURS[c]
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        split = "train" if i < 0.6 * count else "val" if i < 0.8 * count else "test"
        rows.append({"path": f"img/{i}.png", "label": present, "split": split})
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def test_multilabel_jsonl_run_end_to_end(tmp_path, backbone_file, monkeypatch, capsys):
    data = _mosaics(tmp_path / "data", 60)
    monkeypatch.chdir(tmp_path)
    weights = f"--model.weights={backbone_file('test_resnet')}"
    source = [f"--data.labels={data / 'labels.jsonl'}", f"--data.root={data}"]
    main(["fit", *FAST, weights, *source, "--trainer.max_epochs=3", "--seed_everything=0", "--recipe=off"])
    assert "data.task: multilabel" in capsys.readouterr().out
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    (best,) = (run / "checkpoints").glob("best-*val_map*.ckpt")
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_map")]
    for name in ("val_map", "val_f1_micro", "val_f1_macro", "val_exact_match"):
        assert all(0.0 <= float(r[name]) <= 1.0 for r in rows)
    assert max(float(r["val_map"]) for r in rows) > 0.8
    thresholds = torch.load(best, weights_only=True)["state_dict"]["thresholds"].tolist()
    assert read_adapter_config(run / "adapter")["thresholds"] == pytest.approx(thresholds)
    assert {"class_ap.png", "errors.csv"} <= {p.name for p in run.iterdir()}
    title = Image.open(run / "errors.png").text["Title"]
    assert " 0 of " in title or title.endswith("; Grad-CAM of the most confident added class, else missed")

    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(best)])
    with open(run / "test" / "metrics.csv", newline="", encoding="utf-8") as f:
        assert float(next(r for r in csv.DictReader(f) if r.get("test_map"))["test_map"]) > 0.7

    predict = ["predict", f"--data.predict_dir={data / 'img'}", "--trainer.accelerator=cpu"]
    main([*predict, "--ckpt_path", str(best), "--trainer.enable_progress_bar=false"])
    with open(run / "predict" / "predictions.csv", newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    assert list(predictions[0]) == ["path", "labels", "blue", "green", "red"] and len(predictions) == 60
    for row in predictions:
        on = [c for c, t in zip(["blue", "green", "red"], thresholds, strict=True) if float(row[c]) >= t]
        assert json.loads(row["labels"]) == on

    main(["export", "--ckpt_path", str(best), "--output", "model.onnx", "--quantize", "int8", "--min_agreement=0.5"])
    metadata = read_onnx_metadata(tmp_path / "model.fp32.onnx")
    assert metadata["task"] == "multilabel" and metadata["thresholds"] == pytest.approx(thresholds)
    assert read_onnx_metadata(tmp_path / "model.onnx")["thresholds"] == pytest.approx(thresholds)

    # the label-set gate refuses when sets differ too often (forced with an agreement no file can reach)
    images = torch.randn(8, 3, 32, 32)
    refused = quantize_int8(tmp_path / "model.fp32.onnx", tmp_path / "no.onnx", images, images, min_agreement=1.01)
    assert not refused.written and not (tmp_path / "no.onnx").exists()


def test_label_sets_turn_a_class_on_at_or_over_its_threshold():
    on, probs = label_sets(np.array([[0.0, -2.0, 3.0], [1.0, -1.0, 5.0]]), [0.5, 0.2, 0.99])
    assert on.tolist() == [[True, False, False], [True, True, True]]  # sigmoid: 0.5 / 0.12 / 0.95, 0.73 / 0.27 / 0.993
    np.testing.assert_allclose(probs[0], [0.5, 0.1192029, 0.9525741], rtol=1e-6)


def test_the_int8_gate_counts_only_exact_label_sets():
    fp32 = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    int8 = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    assert agree(fp32, int8).tolist() == [True, False, True]
    assert agree(np.array([2, 0]), np.array([2, 1])).tolist() == [True, False]


@pytest.mark.slow
def test_serve_answers_a_multilabel_model_as_predict_writes(tmp_path, backbone_file, monkeypatch):
    from test_serve import multipart, serving

    data = _mosaics(tmp_path / "data", 60, seed=1)
    monkeypatch.chdir(tmp_path)
    weights = f"--model.weights={backbone_file('test_resnet')}"
    source = [f"--data.labels={data / 'labels.jsonl'}", f"--data.root={data}"]
    main(["fit", *FAST, weights, *source, "--trainer.max_epochs=2", "--seed_everything=0", "--recipe=off"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    main(["export", "--ckpt_path", str(best), "--output", "model.onnx"])
    # The test split only: val images set the thresholds, so one of them sits exactly at its class's threshold.
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines()]
    tests = tmp_path / "test_images"
    tests.mkdir()
    for row in rows:
        if row["split"] == "test":
            (tests / Path(row["path"]).name).write_bytes((data / row["path"]).read_bytes())
    predict = ["predict", f"--data.predict_dir={tests}", "--trainer.accelerator=cpu"]
    main([*predict, "--ckpt_path", str(best), "--trainer.enable_progress_bar=false"])
    with open(run / "predict" / "predictions.csv", newline="", encoding="utf-8") as f:
        expected = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    classes = ["blue", "green", "red"]
    with serving("--model", "model.onnx", log=tmp_path / "server.log") as server:
        status, _, info = server.request("GET", "/info")
        assert status == 200
        assert json.loads(info)["model"]["task"] == "multilabel"
        for name, row in sorted(expected.items()):
            status, _, answer = server.predict(*multipart((tests / name).read_bytes(), filename=name))
            assert status == 200, answer
            assert answer["labels"] == json.loads(row["labels"]), name
            scores = [answer["scores"][c] for c in classes]
            torch.testing.assert_close(scores, [float(row[c]) for c in classes], rtol=0, atol=1e-4)
