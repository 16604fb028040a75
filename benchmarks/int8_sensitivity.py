"""Where does int8 lose agreement with float32? For one checkpoint: the int8 file `export --quantize int8` writes,
the same with 16-bit activations (what the weights alone cost), each quantizable node quantized alone (the rest
float32), the most harmful nodes (ranked on the val split) kept float32, how close the float32 decisions sit to a
flip (`borderline`) and the rounding error of the int8 weights themselves; and optionally NNCF's accuracy-controlled
quantization (`--accuracy_control`, OpenVINO), which reverts the most harmful quantizers to float until the agreement
on the val split is within 1 point of float32.

    python benchmarks/int8_sensitivity.py --ckpt_path BEST.ckpt --out benchmarks/results/int8_sensitivity.json

Agreement is measured as the export gate measures it (top-1; a multi-label model: exact label sets at its thresholds)
on the run's test split (else val); calibration as the export calibrates (256 train images). The per-node rows also
give the mean |logit difference| over the standard deviation of the float32 logits, averaged over classes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import machine_info  # noqa: E402

from vision_lora.checkpoint import load_model  # noqa: E402
from vision_lora.deploy.int8 import (  # noqa: E402
    INT8_OP_TYPES,
    _float_nodes,
    agree,
    decisions,
    quantize_int8,
    run_images,
    static_qdq,
)
from vision_lora.deploy.onnx import export_onnx  # noqa: E402


def onnx_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + 32].numpy()})[0] for i in range(0, len(images), 32)])


def result_header(script: str, trained, thresholds, evaluation: torch.Tensor, eval_name: str) -> dict:
    """The opening fields of an int8 study's JSON: command, date, machine, model, measure and evaluation images."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": machine_info(threads=2),
        "model": trained.name,
        "measure": "top-1" if thresholds is None else "exact label-set",
        "evaluation": f"{eval_name} ({len(evaluation)} images)",
    }


def _margins(logits: np.ndarray, thresholds) -> np.ndarray:
    """(N,) how far each image's decision is from changing, in logits: multi-label, the closest class logit to its
    threshold's logit; else the gap between the top two logits."""
    if thresholds is None:
        top = np.sort(logits, 1)
        return top[:, -1] - top[:, -2]
    t = np.clip(np.asarray(thresholds, np.float64), 1e-7, 1 - 1e-7)
    return np.abs(logits - np.log(t / (1 - t))).min(1)


def _weight_rounding(proto: onnx.ModelProto, nodes: list[str]) -> dict:
    """Relative error ||W - int8(W)|| / ||W|| of each node's weight under per-output-channel max-abs int8 rounding,
    as the export rounds it (the exported graph has its batch norms folded into the convs)."""
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    errors = []
    for node in proto.graph.node:
        if node.name in nodes and len(node.input) > 1 and node.input[1] in weights:
            w = weights[node.input[1]].astype(np.float64)
            w = w.reshape(w.shape[0], -1) if node.op_type != "MatMul" else w.T
            scale = np.maximum(np.abs(w).max(1, keepdims=True), 1e-12) / 127
            rounded = np.clip(np.round(w / scale), -127, 127) * scale
            errors.append(float(np.linalg.norm(w - rounded) / np.linalg.norm(w)))
    return {"nodes": len(errors), "min": round(min(errors), 5), "median": round(float(np.median(errors)), 5),
            "max": round(max(errors), 5)}  # fmt: skip


def _accuracy_control(trained, fp32_onnx: Path, evaluation: torch.Tensor, thresholds) -> dict:
    """NNCF's `quantize_with_accuracy_control` on the OpenVINO IR of `fp32_onnx`, its metric the agreement with
    float32 on the val split (max drop 0.01); the agreement of the result on `evaluation`."""
    import nncf
    import openvino as ov

    from vision_lora.deploy.openvino import compile_openvino

    val = run_images(trained, calib_split="val", calib_images=100_000)[0]
    model = ov.convert_model(str(fp32_onnx))

    def run(compiled, images: torch.Tensor) -> np.ndarray:
        return decisions(np.concatenate([compiled(images[i : i + 32].numpy())[0] for i in range(0, len(images), 32)]),
                         thresholds)  # fmt: skip

    float_val = run(compile_openvino(model, "f32"), val)
    items = [(i, val[i : i + 1].numpy()) for i in range(len(val))]

    def validate(compiled, chosen) -> tuple[float, list[float]]:
        chosen = list(chosen)
        logits = np.concatenate([compiled(x)[0] for _, x in chosen])
        same = agree(decisions(logits, thresholds), float_val[[i for i, _ in chosen]]).astype(float)
        return float(same.mean()), same.tolist()

    calibration = run_images(trained, calib_images=256)[0]
    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset([calibration[i : i + 16].numpy() for i in range(0, len(calibration), 16)]),
        nncf.Dataset(items, lambda item: item[1]),
        validate,
        max_drop=0.01,
        subset_size=16,
    )
    seconds = time.perf_counter() - start
    fake = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    full = nncf.quantize(model, nncf.Dataset([calibration[i : i + 16].numpy() for i in range(0, len(calibration), 16)]))
    fake_full = sum(op.get_type_name() == "FakeQuantize" for op in full.get_ops())
    reference = run(compile_openvino(model, "f32"), evaluation)
    return {
        "tool": f"nncf {nncf.__version__} quantize_with_accuracy_control, max_drop 0.01 on val agreement",
        "val_images": len(val),
        "fake_quantize_ops": {"kept": fake, "of_plain_quantize": fake_full},
        "agreement_val": validate(compile_openvino(quantized, "f32"), items)[0],
        "agreement": float(agree(run(compile_openvino(quantized, "f32"), evaluation), reference).mean()),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--accuracy_control", action="store_true", help="also NNCF's accuracy control (OpenVINO)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_sensitivity.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trained = load_model(ckpt_path=args.ckpt_path)
    calibration, evaluation, _, eval_name = run_images(trained, calib_images=256)
    thresholds = trained.thresholds if trained.task == "multilabel" else None
    result = {
        **result_header("int8_sensitivity.py", trained, thresholds, evaluation, eval_name),
        "calibration_images": len(calibration),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fp32, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        settings = dict(class_names=trained.class_names, data_config=trained.data_config, thresholds=thresholds)
        export_onnx(trained.model, fp32, **settings)
        reference = onnx_logits(fp32, evaluation)
        ref_decisions, spread = decisions(reference, thresholds), reference.std(0)

        def measured(path: Path) -> dict:
            logits = onnx_logits(path, evaluation)
            return {
                "agreement": float(agree(decisions(logits, thresholds), ref_decisions).mean()),
                "logit_error_over_std": round(float((np.abs(logits - reference).mean(0) / spread).mean()), 4),
            }

        report = quantize_int8(fp32, quantized, calibration, evaluation, min_agreement=0.0)
        result["as_exported"] = {
            **measured(quantized),
            "size_of_fp32": round(report.size_bytes / report.fp32_size_bytes, 3),
        }
        kept_float = _float_nodes(onnx.load(str(fp32)), INT8_OP_TYPES)
        static_qdq(fp32, quantized, calibration, kept_float, activations="QUInt16")
        result["int8_weights_16bit_activations"] = measured(quantized)
        nodes = [
            n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in INT8_OP_TYPES and n.name not in kept_float
        ]
        result["one_node_int8"] = {}
        for name in nodes:
            static_qdq(fp32, quantized, calibration, kept_float + [n for n in nodes if n != name])
            result["one_node_int8"][name] = measured(quantized)
            print(name, result["one_node_int8"][name], flush=True)
        solo = [row["agreement"] for row in result["one_node_int8"].values()]
        result["one_node_int8_summary"] = {"nodes": len(solo), "min": min(solo), "median": float(np.median(solo)),
                                           "under_0.99": sum(a < 0.99 for a in solo)}  # fmt: skip
        result["weight_rounding"] = _weight_rounding(onnx.load(str(fp32)), nodes)
        margins = _margins(reference, thresholds)
        static_qdq(fp32, quantized, calibration, kept_float)
        error = np.abs(onnx_logits(quantized, evaluation) - reference)
        result["borderline"] = {
            "share_of_images_within_logits": {str(d): float((margins < d).mean()) for d in (0.1, 0.2, 0.3, 0.5, 1.0)},
            "int8_mean_abs_logit_error": round(float(error.mean()), 4),
            "float32_logit_std": round(float(spread.mean()), 3),
        }
        # Float fallback in onnxruntime: rank the nodes by their one-node agreement on the val split (not the
        # evaluation images), keep the k most harmful float32.
        val = run_images(trained, calib_split="val", calib_images=100_000)[0]
        val_reference = decisions(onnx_logits(fp32, val), thresholds)
        harm = {}
        for name in nodes:
            static_qdq(fp32, quantized, calibration, kept_float + [n for n in nodes if n != name])
            harm[name] = float(agree(decisions(onnx_logits(quantized, val), thresholds), val_reference).mean())
        ranked = sorted(nodes, key=lambda n: harm[n])
        result["float_fallback"] = {"ranked_on": f"val ({len(val)} images)", "kept_float": {}}
        for k in (4, 8, 12, 16):
            static_qdq(fp32, quantized, calibration, kept_float + ranked[:k])
            row = {**measured(quantized), "size_of_fp32": round(quantized.stat().st_size / fp32.stat().st_size, 3)}
            result["float_fallback"]["kept_float"][f"{k} of {len(nodes)}"] = row
            print("float fallback", k, row, flush=True)
        if args.accuracy_control:
            result["accuracy_control"] = _accuracy_control(trained, fp32, evaluation, thresholds)
    print(json.dumps({k: v for k, v in result.items() if k != "one_node_int8"}, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
