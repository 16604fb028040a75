"""Does `vision-lora serve`'s batching pay where the model's compute dominates? Served batch-16 / batch-1 throughput
at 16 clients against the model-only onnxruntime batch-16 / batch-1 throughput, in the same run, for the quickstart
model (96 px, where HTTP dominates) and vit_small_patch16_224 (224 px, random weights, 10-class head).

    flock /tmp/vision_lora_bench.lock python benchmarks/serve_batching.py --ckpt_path <quickstart best.ckpt>

For each model: exports fp32 ONNX; starts two servers (`--max_batch_size 16 --batch_timeout_ms 5` and
`--max_batch_size 1`); then `--rounds` times, alternately: the model alone in onnxruntime with serve's session settings
(images/s at batch 1 and 16, and its CPU ms per image), and 16 client threads against each server (req/s, mean batch,
CPU ms per request of the client, the HTTP process and the inference worker: where a request's time goes). The
ratios are medians over rounds. Writes `benchmarks/results/serve_batching.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from runtime_latency import machine  # noqa: E402
from serve_load import load, multipart, server  # noqa: E402


def model_only(path: Path, input_size: list[int], images: int) -> dict:
    """onnxruntime alone, with the session settings of `serve` (all cores, no idle spinning): images/s and CPU ms
    per image at batch 1 and 16, on `images` images each."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = {}
    for batch in (1, 16):
        x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
        session.run(None, {"input": x})
        n = max(1, images // batch)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            session.run(None, {"input": x})
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[f"batch{batch}_images_per_s"] = round(n * batch / wall, 2)
        out[f"batch{batch}_cpu_ms_per_image"] = round(cpu * 1000 / (n * batch), 2)
    out["batch16_over_batch1"] = round(out["batch16_images_per_s"] / out["batch1_images_per_s"], 3)
    return out


def measure(name: str, fp32: Path, input_size: list[int], bodies, labels, args, tmp: Path, requests: int) -> dict:
    b16 = ["--model", str(fp32), "--max_batch_size", "16", "--batch_timeout_ms", str(args.batch_timeout_ms)]
    b1 = ["--model", str(fp32), "--max_batch_size", "1"]
    rounds = []
    with server(*b16, log=tmp / f"{name}16.log") as (port16, p16), server(*b1, log=tmp / f"{name}1.log") as (port1, p1):
        for port in (port16, port1):
            load(port, bodies[:16], labels[:16], 4, 8, 60)  # warm-up
        for _ in range(args.rounds):
            alone = model_only(fp32, input_size, requests)
            served = [
                load(port, bodies, labels, 16, requests, args.max_seconds, server_pid=pid)
                for port, pid in ((port16, p16.pid), (port1, p1.pid))
            ]
            rounds.append(
                {
                    "model_only": alone,
                    "served_batch16": served[0],
                    "served_batch1": served[1],
                    "served_batch16_over_batch1": round(served[0]["req_per_s"] / served[1]["req_per_s"], 3),
                }
            )
            print(name, json.dumps(rounds[-1]), flush=True)
    served_ratio = statistics.median(r["served_batch16_over_batch1"] for r in rounds)
    model_ratio = statistics.median(r["model_only"]["batch16_over_batch1"] for r in rounds)
    return {
        "model": name,
        "input_size": input_size,
        "requests_per_round": requests,
        "rounds": rounds,
        "served_batch16_over_batch1_c16": round(served_ratio, 3),
        "model_only_batch16_over_batch1": round(model_ratio, 3),
        "served_ratio_over_model_ratio": round(served_ratio / model_ratio, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a quickstart checkpoint")
    p.add_argument("--data", default=str(ROOT / "data/digits"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=270, help="requests per quickstart round")
    p.add_argument("--vit_requests", type=int, default=64, help="requests per ViT-S round")
    p.add_argument("--batch_timeout_ms", type=float, default=5.0)
    p.add_argument("--max_seconds", type=float, default=120)
    p.add_argument("--skip_quickstart", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_batching.json"))
    args = p.parse_args()
    import timm
    import torch

    from vision_lora.checkpoint import load_model
    from vision_lora.deploy.onnx import export_onnx

    files = sorted((Path(args.data) / "test").rglob("*.png"))
    bodies, labels = [multipart(f.read_bytes()) for f in files], [f.parent.name for f in files]
    result = {
        "date": str(date.today()),
        "command": "python benchmarks/serve_batching.py " + " ".join(sys.argv[1:]),
        "machine": machine(0),
        "models": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_batching_") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_quickstart:
            trained = load_model(ckpt_path=args.ckpt_path)
            path = tmp / "quickstart.onnx"
            export_onnx(trained.model, path, class_names=trained.class_names, data_config=trained.data_config)
            size = list(trained.data_config["input_size"])
            result["models"].append(measure("quickstart", path, size, bodies, labels, args, tmp, args.requests))
        torch.manual_seed(0)
        vit = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
        path = tmp / "vit_small.onnx"
        export_onnx(vit, path, class_names=sorted({f.parent.name for f in files}))
        result["models"].append(
            measure("vit_small_patch16_224", path, [3, 224, 224], bodies, labels, args, tmp, args.vit_requests)
        )
    result["seconds"] = round(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({m["model"]: {k: v for k, v in m.items() if k != "rounds"} for m in result["models"]}, indent=2))


if __name__ == "__main__":
    main()
