"""Export a trained adapter to ONNX and compare onnxruntime latency with PyTorch eager on this CPU.

    vision-lora fit --config configs/quickstart.yaml          # writes runs/quickstart/version_N/adapter
    python benchmarks/export_latency.py                        # newest quickstart adapter
    python benchmarks/export_latency.py --adapter runs/quickstart/version_0/adapter --reps 30

Prints export time, file size and parity (from `export_onnx`), then the median latency at batch 1 and 16 of
onnxruntime, of the merged PyTorch model and of the unmerged (LoRA) PyTorch model, measured alternately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="adapter directory; default: the newest runs/quickstart/version_*/adapter")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out",
        default=None,
        help="also write the figures as JSON here (the figures kept: benchmarks/results/export_latency.json)",
    )
    args = p.parse_args()
    import onnxruntime as ort  # after parsing: `--help` does not wait for torch
    import torch

    from vision_lora import merge_lora, read_adapter_config
    from vision_lora.export import build_from_adapter, export_onnx

    torch.set_num_threads(args.threads)
    adapter = args.adapter or str(
        max(Path("runs/quickstart").glob("version_*/adapter"), key=lambda d: d.stat().st_mtime)
    )

    info = read_adapter_config(adapter)
    class_names, data_config = info["class_names"], info["data_config"]
    model = build_from_adapter(adapter).eval()
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(model, Path(tmp) / "model.onnx", class_names=class_names, data_config=data_config)
        print(report)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        # onnxruntime's idle threads spin for a while after each run, which would slow the PyTorch run after it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
        merged = merge_lora(build_from_adapter(adapter)).eval()
        results = {
            "adapter": adapter,
            "size_bytes": report.size_bytes,
            "export_seconds": report.export_seconds,
            "max_abs_diff": report.max_abs_diff,
            "latency_ms": {},
        }
        for batch in args.batch_sizes:
            x = torch.randn(batch, *data_config["input_size"])
            runs = {
                "onnxruntime": lambda x=x: session.run(["logits"], {"input": x.numpy()}),
                "torch_merged": lambda x=x: merged(x),
                "torch_unmerged": lambda x=x: model(x),
            }
            times = {k: [] for k in runs}
            with torch.inference_mode():
                for fn in runs.values():
                    fn()
                for _ in range(args.reps):
                    for name, fn in runs.items():
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            results["latency_ms"][batch] = med
            ratio = med["onnxruntime"] / med["torch_merged"]
            print(
                f"batch {batch:>3}: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
                + f"; onnxruntime / torch merged {ratio:.2f}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
