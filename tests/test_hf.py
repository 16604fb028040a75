"""Hugging Face datasets as a data source (the [hf] extra): ClassLabel and list-of-ClassLabel labels, splits, bytes
decoded by our own decoder, so the same images as a label file give the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from test_multilabel import _mosaics

from vision_lora.data import ImageFolderDataModule
from vision_lora.errors import VisionLoRAError

datasets = pytest.importorskip("datasets")

_NAMES = ["blue", "green", "red"]


def _save(data, out, multilabel: bool = True):
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines()]
    label = datasets.List(datasets.ClassLabel(names=_NAMES)) if multilabel else datasets.ClassLabel(names=_NAMES)
    features = datasets.Features({"img": datasets.Image(), "tags": label})

    def part(split):
        chosen = [r for r in rows if r["split"] == split and (multilabel or len(r["label"]) == 1)]
        tags = [[_NAMES.index(x) for x in r["label"]] if multilabel else _NAMES.index(r["label"][0]) for r in chosen]
        return datasets.Dataset.from_dict({"img": [str(data / r["path"]) for r in chosen], "tags": tags}, features)

    splits = {"train": part("train"), "validation": part("val"), "test": part("test")}
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def _module(**kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(num_workers=0, augment="none", preprocess={"input_size": (3, 32, 32)}, **kwargs)


def test_a_saved_dataset_gives_the_tensors_of_the_same_label_file(tmp_path):
    data = _mosaics(tmp_path / "data", 30)
    saved = _save(data, tmp_path / "hf")
    hf = _module(hf=str(saved), hf_image_column="img", hf_label_column="tags")
    jsonl = _module(labels=str(data / "labels.jsonl"))
    assert hf.task == jsonl.task == "multilabel" and hf.class_names == jsonl.class_names == _NAMES
    for module in (hf, jsonl):
        module.setup("test")
    for i in range(len(jsonl.datasets["test"])):
        image, target, _ = hf.datasets["test"][i]
        expected_image, expected_target, _ = jsonl.datasets["test"][i]
        torch.testing.assert_close(image, expected_image, rtol=0, atol=0)
        assert target == expected_target


def test_a_class_label_column_is_single_label_with_a_held_out_val(tmp_path):
    data = _mosaics(tmp_path / "data", 40)
    saved = tmp_path / "hf"
    _save(data, saved, multilabel=False)
    train_only = datasets.load_from_disk(str(saved))["train"]
    train_only.save_to_disk(str(tmp_path / "train_only"))
    module = _module(hf=str(tmp_path / "train_only"), hf_image_column="img", hf_label_column="tags")
    assert module.task == "multiclass" and module.folder.splits() == ["train", "val"]
    assert sum(module.train_class_counts()) == len(module.folder.samples("train")[0])


@pytest.mark.slow  # the offline hub lookup alone takes about 20 s
def test_missing_columns_and_hub_names_are_one_line_errors(tmp_path):
    data = _mosaics(tmp_path / "data", 10)
    saved = _save(data, tmp_path / "hf")
    with pytest.raises(VisionLoRAError, match="has no column 'image'.*data.hf_image_column"):
        _module(hf=str(saved))
    with pytest.raises(VisionLoRAError, match="could not be loaded offline"):
        _module(hf="someone/not-a-local-dataset")


def test_integer_labels_are_classes_in_numeric_order(tmp_path):
    data = _mosaics(tmp_path / "data", 24)
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines()]
    paths = [str(data / r["path"]) for r in rows]
    values = [(i * 5) % 12 for i in range(len(rows))]  # 0..11: "10" and "11" come after "9", not after "1"
    single = datasets.Dataset.from_dict({"image": paths, "label": values}).cast_column("image", datasets.Image())
    single.save_to_disk(str(tmp_path / "ints"))
    module = _module(hf=str(tmp_path / "ints"))
    assert module.task == "multiclass" and module.class_names == [str(v) for v in range(12)]
    train, val = module.folder.samples("train")[1], module.folder.samples("val")[1]
    assert sorted(train + val) == sorted(values)  # each integer is its own class index here
    lists = datasets.Dataset.from_dict({"image": paths, "label": [[v, 3] if v != 3 else [] for v in values]})
    lists.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "int_lists"))
    module = _module(hf=str(tmp_path / "int_lists"))
    assert module.task == "multilabel" and module.class_names == [str(v) for v in range(12)]
    targets = module.folder.samples("train")[1] + module.folder.samples("val")[1]
    assert sorted(tuple(int(i) for i, on in enumerate(t) if on) for t in targets) == sorted(
        tuple(sorted({v, 3})) if v != 3 else () for v in values
    )
