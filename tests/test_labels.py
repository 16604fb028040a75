"""Label files (CSV / JSONL) as a data source: the class map, the splits, and every bad row as a one-line error that
names the file and the line, before any training step."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_lora.data import ImageFolderDataModule
from vision_lora.data.labels import LabelFileSource
from vision_lora.data.samples import BalancedEpochSampler, EpochSampler, class_balanced_weights
from vision_lora.errors import VisionLoRAError


def _images(root: Path, count: int) -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(count)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_single_label_with_splits_and_fixed_classes(tmp_path):
    paths = _images(tmp_path, 6)
    lines = ["path,label,split"] + [
        f"{p},{'cat' if i % 2 else 'dog'},{['train', 'train', 'train', 'train', 'val', 'test'][i]}"
        for i, p in enumerate(paths)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = LabelFileSource(tmp_path / "labels.csv", tmp_path, classes=["dog", "cat", "bird"])
    assert source.task == "multiclass" and source.class_names == ["dog", "cat", "bird"]
    assert source.splits() == ["train", "val", "test"]
    assert source.samples("train")[1] == [0, 1, 0, 1]
    assert source.samples("val") == ([str(tmp_path / "img/4.png")], [0])


def test_csv_as_spreadsheets_write_it_semicolons_bom_crlf_and_a_tsv(tmp_path):
    paths = _images(tmp_path, 4)
    rows = [(p, "cat" if i % 2 else "dog", "val" if i == 3 else "train") for i, p in enumerate(paths)]
    excel = "Path ; Label ; Split\r\n" + "".join(f"{p}; {c} ;{s} \r\n" for p, c, s in rows)
    (tmp_path / "excel.csv").write_bytes(excel.encode("utf-8-sig"))
    tsv = "path\tlabel\tsplit\n" + "".join(f"{p}\t{c}\t{s}\n" for p, c, s in rows)
    (tmp_path / "labels.tsv").write_text(tsv, encoding="utf-8")
    for name in ("excel.csv", "labels.tsv"):
        source = LabelFileSource(tmp_path / name, tmp_path)
        assert source.class_names == ["cat", "dog"]
        assert source.samples("train") == ([str(tmp_path / p) for p, _, _ in rows[:3]], [1, 0, 1])
        assert source.samples("val") == ([str(tmp_path / rows[3][0])], [0])


def test_jsonl_lists_make_a_multilabel_source_with_a_printed_line(tmp_path, capsys):
    paths = _images(tmp_path, 8)
    rows = [{"path": p, "label": [["a"], ["b"], ["a", "b"], []][i % 4]} for i, p in enumerate(paths)]
    source = LabelFileSource(_jsonl(tmp_path / "l.jsonl", rows), tmp_path, val_fraction=0.25, seed=3)
    assert "data.task: multilabel" in capsys.readouterr().out
    assert source.task == "multilabel" and source.class_names == ["a", "b"]
    train, val = source.samples("train"), source.samples("val")
    assert len(train[0]) == 6 and len(val[0]) == 2 and not set(train[0]) & set(val[0])
    targets = dict(zip(*[train[0] + val[0], train[1] + val[1]], strict=True))
    assert targets[str(tmp_path / "img/2.png")] == (1.0, 1.0) and targets[str(tmp_path / "img/3.png")] == (0.0, 0.0)
    # the same seed gives the same split
    again = LabelFileSource(tmp_path / "l.jsonl", tmp_path, val_fraction=0.25, seed=3)
    assert again.samples("val") == val


def test_csv_multilabel_cells_split_on_label_sep(tmp_path):
    paths = _images(tmp_path, 4)
    cells = ["a|b", "b", "", "a"]
    text = "path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, cells, strict=True))
    (tmp_path / "l.csv").write_text(text, encoding="utf-8")
    source = LabelFileSource(tmp_path / "l.csv", tmp_path, task="multilabel", label_sep="|", val_fraction=0.25)
    everything = dict(zip(*[sum((source.samples(s)[i] for s in source.splits()), []) for i in (0, 1)], strict=True))
    assert everything[str(tmp_path / "img/0.png")] == (1.0, 1.0)
    assert everything[str(tmp_path / "img/2.png")] == (0.0, 0.0)


@pytest.mark.parametrize(
    "row, line, words",
    [
        ({"path": "img/9.png", "label": "a"}, 3, "does not exist"),
        ({"path": "../outside.png", "label": "a"}, 3, "not inside data.root"),
        ({"path": "/etc/passwd", "label": "a"}, 3, "not inside data.root"),
        ({"path": "img/0.png", "label": "b"}, 3, "repeats line 1"),
        ({"path": "img/2.png", "label": ""}, 3, "label is empty"),
        ({"path": "img/2.png", "label": "zebra"}, 3, "not in data.classes"),
        ({"path": "img/2.png", "label": "a", "split": "holdout"}, 3, "split 'holdout'"),
    ],
)
def test_each_bad_row_is_one_line_naming_file_and_line(tmp_path, row, line, words):
    paths = _images(tmp_path, 3)
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / paths[0]).read_bytes())
    rows = [{"path": paths[0], "label": "a"}, {"path": paths[1], "label": "b"}, row]
    file = _jsonl(tmp_path / "l.jsonl", rows)
    with pytest.raises(VisionLoRAError) as err:
        LabelFileSource(file, tmp_path, classes=["a", "b"])
    message = str(err.value)
    assert message.startswith(f"{file}:{line}:") and words in message and "\n" not in message


def test_a_symlink_out_of_root_is_refused_unless_allowed(tmp_path):
    paths = _images(tmp_path / "root", 2)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((tmp_path / "root" / paths[0]).read_bytes())
    os.symlink(outside, tmp_path / "root" / "img" / "link.png")
    rows = [{"path": paths[0], "label": "a"}, {"path": paths[1], "label": "b"}, {"path": "img/link.png", "label": "a"}]
    file = _jsonl(tmp_path / "l.jsonl", rows)
    with pytest.raises(VisionLoRAError, match=r"l\.jsonl:3: img/link\.png links outside data\.root"):
        LabelFileSource(file, tmp_path / "root")
    source = LabelFileSource(file, tmp_path / "root", allow_outside_root=True, val_fraction=0.34)
    assert sum(len(source.samples(s)[0]) for s in source.splits()) == 3


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    paths = _images(tmp_path, 2)
    text = f"path,label\n{paths[0]},a\n{paths[1]},".encode() + "b\xe9\n".encode("latin-1")
    (tmp_path / "l.csv").write_bytes(text)
    with pytest.raises(VisionLoRAError, match=r"l\.csv:3: the label file is not UTF-8"):
        LabelFileSource(tmp_path / "l.csv", tmp_path)


def test_a_multilabel_class_absent_from_train_is_warned_by_name(tmp_path):
    paths = _images(tmp_path, 4)
    rows = [{"path": p, "label": ["a"], "split": "train"} for p in paths[:3]]
    rows.append({"path": paths[3], "label": ["a", "rare"], "split": "val"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LabelFileSource(_jsonl(tmp_path / "l.jsonl", rows), tmp_path)
    assert any("rare never appear in train" in str(w.message) for w in caught)


def test_the_datamodule_reads_a_label_file_and_batches_multi_hot_targets(tmp_path):
    paths = _images(tmp_path, 8)
    rows = [{"path": p, "label": [["a"], ["b"], ["a", "b"], []][i % 4]} for i, p in enumerate(paths)]
    data = ImageFolderDataModule(
        labels=str(_jsonl(tmp_path / "l.jsonl", rows)),
        num_workers=0,
        batch_size=4,
        augment="none",
        preprocess={"input_size": (3, 16, 16)},
    )
    assert data.task == "multilabel" and data.source == "labels" and data.num_classes == 2
    assert data.train_class_counts() == [
        sum(h[0] for h in data.folder.samples("train")[1]),
        sum(h[1] for h in data.folder.samples("train")[1]),
    ]
    data.setup("validate")
    images, targets = data.on_before_batch_transfer(next(iter(data.val_dataloader())), 0)
    assert images.shape[1:] == (3, 16, 16) and targets.dtype == torch.float32 and targets.shape[1] == 2


def test_multilabel_needs_a_source_that_has_label_sets(image_folder):
    with pytest.raises(VisionLoRAError, match="multilabel needs a label file"):
        ImageFolderDataModule(str(image_folder), task="multilabel")


def test_the_balanced_sampler_draws_classes_equally_and_shards_exactly():
    labels = [0] * 90 + [1] * 10
    dataset = list(range(100))
    weights = class_balanced_weights(labels)
    draws = [
        i for epoch in range(20) for i, _ in BalancedEpochSampler(dataset, weights, seed=1, epoch_key=lambda e=epoch: e)
    ]
    share = sum(labels[i] for i in draws) / len(draws)
    assert abs(share - 0.5) < 0.03
    # two ranks together draw exactly the one-rank epoch (minus the remainder), each draw once
    one = list(BalancedEpochSampler(dataset, weights, seed=1, epoch_key=lambda: 5))
    ranks = [
        list(BalancedEpochSampler(dataset, weights, seed=1, epoch_key=lambda: 5, num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 50
    assert sorted(ranks[0] + ranks[1], key=lambda p: p[1]) == sorted(one, key=lambda p: p[1])
    assert len(EpochSampler(dataset)) == len(BalancedEpochSampler(dataset, weights))
