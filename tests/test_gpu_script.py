"""`python benchmarks/gpu.py --smoke`: the one script a lent GPU runs works end to end, on the CPU with tiny models,
before a GPU is ever lent; every section is there with finite numbers or a reason it was skipped."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["data", "machine", "train/test_vit", "train/test_convnext", "export", "infer", "summary"]


def _leaves(value, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def test_gpu_script_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [k for k in results if k not in ("command", "seconds")] == SECTIONS
    for section in SECTIONS:
        store = results[section]
        assert "error" not in store and "skipped" not in store, (section, store)
        for path, value in _leaves(store):
            if isinstance(value, float):
                assert math.isfinite(value), f"{section}{path} = {value}"
    for model in ("test_vit", "test_convnext"):
        train = results[f"train/{model}"]
        for variant in ("vlora", "peft", "full"):
            assert isinstance(train[variant], dict), (model, variant, train[variant])  # a skip says why
            assert train[variant]["images_per_s"] > 0 and train[variant]["trainable_params"] > 0
            assert train[variant]["peak_memory_gb"].startswith("skipped: no CUDA device")
        assert train["vlora"]["trainable_params"] < train["full"]["trainable_params"] / 5
    assert results["train/test_vit"]["vlora_compile"]["images_per_s"] > 0
    assert results["train/test_convnext"]["vlora_compile"].startswith("skipped:")
    data = results["data"]
    assert data["folder_per_core"] > 0 and data["folder_full_decode_per_core"] > 0 and data["optimized_per_core"] > 0
    export = results["export"]
    assert export["merged_vs_unmerged_max_abs_diff"] < 1e-4 and export["merged_vs_unmerged_top1_agreement"] == 1.0
    assert export["onnx_vs_merged_max_abs_diff"] < 1e-4 and export["onnxruntime_provider"] == "CPUExecutionProvider"
    infer = results["infer"]
    assert infer["onnxruntime"].startswith("skipped:")
    assert infer["batch1"]["pytorch_fp32_ms"] > 0 and infer["batch4"]["pytorch_fp32_images_per_s"] > 0
    cores = results["summary"]
    assert cores["lightning_imported"] is False  # the lent device may not have Lightning
    assert cores["cores_needed/test_vit/vlora/folder"] > 0 and cores["cores_needed/test_vit/vlora/optimized"] > 0
    machine = results["machine"]
    assert machine["gpu"].startswith("skipped:") and machine["cpu_flags"] and machine["torch"] == _torch_version()


def _torch_version() -> str:
    import torch

    return torch.__version__
