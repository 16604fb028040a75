"""The same multi-label data four ways (CSV, JSONL, a saved Hugging Face dataset, optimized shards written by
`vision-lora optimize` from the label file): one class map, and per image the same tensor and target, so one
checkpoint gives the same logits whatever the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hf import _save
from test_multilabel import _mosaics

from vision_lora.cli import main
from vision_lora.data import ImageFolderDataModule

pytest.importorskip("datasets")
pytest.importorskip("litdata")


def _by_name(module: ImageFolderDataModule, split: str) -> dict[str, tuple]:
    module.setup("test" if split == "test" else "validate")
    dataset = module.datasets[split]
    items = [dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__") else list(dataset)
    return {Path(key).name: (image, tuple(target)) for image, target, key in items}


def test_the_same_data_four_ways_gives_the_same_tensors(tmp_path):
    data = _mosaics(tmp_path / "data", 30)
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines()]
    csv_text = "path,label,split\n" + "".join(f"{r['path']},{'|'.join(r['label'])},{r['split']}\n" for r in rows)
    (data / "labels.csv").write_text(csv_text, encoding="utf-8")
    saved = _save(data, tmp_path / "hf")
    shards = tmp_path / "shards"
    main(
        [
            "optimize",
            f"--data.labels={data / 'labels.jsonl'}",
            f"--data.root={data}",
            f"--output={shards}",
            "--num_workers=1",
        ]
    )
    common = dict(num_workers=0, augment="none", preprocess={"input_size": (3, 32, 32)})
    modules = {
        "csv": ImageFolderDataModule(labels=str(data / "labels.csv"), task="multilabel", label_sep="|", **common),
        "jsonl": ImageFolderDataModule(labels=str(data / "labels.jsonl"), **common),
        "hf": ImageFolderDataModule(hf=str(saved), hf_image_column="img", hf_label_column="tags", **common),
        "optimized": ImageFolderDataModule(str(shards), **common),
    }
    assert {name: (m.task, tuple(m.class_names)) for name, m in modules.items()} == {
        name: ("multilabel", ("blue", "green", "red")) for name in modules
    }
    reference = _by_name(modules["jsonl"], "test")
    assert len(reference) == 6
    for name in ("csv", "hf", "optimized"):
        found = _by_name(modules[name], "test")
        assert sorted(found) == sorted(reference), name
        for key, (image, target) in reference.items():
            torch.testing.assert_close(found[key][0], image, rtol=0, atol=0)
            assert found[key][1] == target, (name, key)
