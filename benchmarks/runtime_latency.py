"""OpenVINO against onnxruntime on this CPU: fp32 and int8 latency at batch 1 and 16, for the quickstart model and
vit_small_patch16_224 (random weights, 10-class head, calibrated on the digits at 224 px).

    python benchmarks/runtime_latency.py --ckpt_path runs/quickstart/version_0/checkpoints/best-*.ckpt
    flock /tmp/vision_lora_bench.lock python benchmarks/runtime_latency.py ...   # on a shared machine

For each model it writes, in a temporary folder: the fp32 ONNX file (`export_onnx`), onnxruntime int8 variants
(`quantize_int8`'s QDQ u8/s8 per-channel default; the same as QOperator; s8 activations), the fp32 OpenVINO IR
(`export_openvino`) and its NNCF int8. Then it times every file at batch 1 and 16 in alternating rounds (median), with
`--threads` compute threads: onnxruntime's default session, OpenVINO with f32 inference precision (what the export is
verified at) and, for the fp32 IR, OpenVINO's default precision for this CPU (bf16 on AVX512-BF16 / AMX CPUs) with its
max logit difference from f32. onnxruntime's profiler lists the kernels its int8 sessions run. CPU flags and versions
go into the JSON (`benchmarks/results/runtime_latency.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def machine(threads: int) -> dict:
    """CPU model and flags, package versions and the thread count, for every JSON this writes."""
    import onnxruntime
    import openvino
    import torch

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor(),
        "cpus": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in FLAGS},
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
        "python": platform.python_version(),
    }


def ort_session(path: Path, threads: int, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle threads that spin after a run would take the cores from the next file's run in the alternation.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_kernels(path: Path, input_size: list[int], threads: int, tmp: Path) -> dict:
    """The op types onnxruntime runs for `path` after its graph optimizations, with their share of the run time."""
    session = ort_session(path, threads, profile=str(tmp / "profile"))
    x = np.random.default_rng(0).standard_normal((1, *input_size)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"input": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    time_by_op = Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_by_op[args.get("op_name", "?")] += event.get("dur", 0)
    total = sum(time_by_op.values()) or 1
    return {op: round(t / total, 3) for op, t in time_by_op.most_common(8)}


def timed(runs: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of each callable in `runs`, measured in alternating rounds after two warm-up calls."""
    for fn in runs.values():
        fn()
        fn()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def ort_variants(fp32: Path, tmp: Path, name: str, calibration, evaluation) -> dict[str, Path]:
    """onnxruntime int8 files: the exported default (QDQ, uint8 activations, int8 per-channel weights) and two
    variants of the format and activation type, with the same float nodes."""
    import onnx

    from vision_lora.deploy.int8 import INT8_OP_TYPES, _float_nodes, quantize_int8, static_qdq

    files = {"ort_int8_qdq_u8s8": tmp / f"{name}.int8.onnx"}
    quantize_int8(fp32, files["ort_int8_qdq_u8s8"], calibration, evaluation, min_agreement=0.0)
    floats = _float_nodes(onnx.load(str(fp32)), INT8_OP_TYPES)
    for key, fmt, act in (("ort_int8_qoperator_u8s8", "QOperator", "QUInt8"), ("ort_int8_qdq_s8s8", "QDQ", "QInt8")):
        files[key] = tmp / f"{name}.{key}.onnx"
        static_qdq(fp32, files[key], calibration, floats, activations=act, quant_format=fmt)
    return files


def measure(name: str, model, cfg: dict, class_names, calibration, evaluation, args, tmp: Path) -> dict:
    """Every runtime and precision of one model at batch 1 and 16."""
    from vision_lora.deploy.openvino import compile_openvino, export_openvino, quantize_openvino_int8

    fp32_onnx, ov_fp32 = tmp / f"{name}.onnx", tmp / f"{name}.xml"
    export_openvino(model, ov_fp32, class_names=class_names, data_config=cfg, onnx_output=fp32_onnx)
    ov_int8 = tmp / f"{name}.int8.xml"
    quantize_openvino_int8(ov_fp32, ov_int8, calibration, evaluation, min_agreement=0.0)
    onnx_files = {"ort_fp32": fp32_onnx, **ort_variants(fp32_onnx, tmp, name, calibration, evaluation)}
    input_size = list(cfg["input_size"])
    sessions = {k: ort_session(p, args.threads) for k, p in onnx_files.items()}
    compiled = {
        "ov_fp32_f32": compile_openvino(ov_fp32, "f32", args.threads, "LATENCY"),
        "ov_fp32_default_precision": compile_openvino(ov_fp32, "default", args.threads, "LATENCY"),
        "ov_int8_f32": compile_openvino(ov_int8, "f32", args.threads, "LATENCY"),
    }
    out = {"model": name, "input_size": input_size, "latency_ms": {}}
    out["ov_default_precision"] = str(compiled["ov_fp32_default_precision"].get_property("INFERENCE_PRECISION_HINT"))
    x16 = np.random.default_rng(0).standard_normal((16, *input_size)).astype(np.float32)
    f32, default = compiled["ov_fp32_f32"](x16)[0], compiled["ov_fp32_default_precision"](x16)[0]
    out["ov_default_precision_max_abs_diff_vs_f32"] = float(np.abs(f32 - default).max())
    out["max_abs_logit"] = float(np.abs(f32).max())
    out["ov_default_precision_top1_agreement_vs_f32"] = float((f32.argmax(1) == default.argmax(1)).mean())
    for batch, reps in ((1, args.reps), (16, max(3, args.reps // 5))):
        x = x16[:batch]
        runs = {k: (lambda s=s, x=x: s.run(None, {"input": x})) for k, s in sessions.items()}
        runs |= {k: (lambda c=c, x=x: c(x)) for k, c in compiled.items()}
        out["latency_ms"][f"batch{batch}"] = ms = timed(runs, reps)
        int8_best = min(v for k, v in ms.items() if "int8" in k)
        fp32_best = min(ms["ort_fp32"], ms["ov_fp32_f32"])
        out[f"best_int8_over_best_fp32_batch{batch}"] = round(int8_best / fp32_best, 3)
        out[f"best_int8_over_ort_fp32_batch{batch}"] = round(int8_best / ms["ort_fp32"], 3)
        print(name, batch, ms, flush=True)
    out["ort_int8_kernels_batch1"] = {
        k: ort_kernels(p, input_size, args.threads, tmp) for k, p in onnx_files.items() if "int8" in k
    }
    out["sizes_mb"] = {k: round(p.stat().st_size / 1e6, 2) for k, p in onnx_files.items()}
    for k, p in (("ov_fp32", ov_fp32), ("ov_int8", ov_int8)):
        out["sizes_mb"][k] = round((p.stat().st_size + p.with_suffix(".bin").stat().st_size) / 1e6, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a quickstart checkpoint")
    p.add_argument("--data", default=str(ROOT / "data/digits"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20, help="repetitions at batch 1 (batch 16: a fifth, at least 3)")
    p.add_argument("--skip_vit", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/runtime_latency.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import timm
    import torch

    from vision_lora.checkpoint import load_model
    from vision_lora.deploy.int8 import run_images
    from vision_lora.export import image_files, preprocess_files

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "date": str(date.today()),
        "command": "python benchmarks/runtime_latency.py " + " ".join(sys.argv[1:]),
        "machine": machine(args.threads),
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="runtime_latency_") as tmp_name:
        tmp = Path(tmp_name)
        trained = load_model(ckpt_path=args.ckpt_path)
        calibration, evaluation, _, _ = run_images(trained, data_root=args.data)
        result["models"].append(
            measure(
                "quickstart_tf_efficientnet_lite0_96px",
                trained.model,
                trained.data_config,
                trained.class_names,
                calibration,
                evaluation,
                args,
                tmp,
            )
        )
        if not args.skip_vit:
            torch.manual_seed(0)
            vit = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
            cfg = timm.data.resolve_model_data_config(vit)
            images = preprocess_files(image_files(Path(args.data) / "train", 64), cfg)
            result["models"].append(measure("vit_small_patch16_224", vit, cfg, None, images, images, args, tmp))
    result["seconds"] = round(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
