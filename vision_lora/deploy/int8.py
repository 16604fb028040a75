"""Static int8 quantization of an exported ONNX file with onnxruntime, written only when its top-1 agreement with
the float32 file reaches a minimum on real images; `quantize_trained` takes those images from the run's data."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from .._io import atomic_write
from ..checkpoint import TrainedModel
from ..data.folder import image_files, labelled_images, readable_files
from ..errors import VisionLoRAError
from ..multilabel import label_sets
from .onnx import INPUT_NAME, OUTPUT_NAME, check_graph, read_onnx_metadata

__all__ = [
    "INT8_OP_TYPES",
    "QuantizationReport",
    "agree",
    "check_agreement",
    "decisions",
    "quantize_int8",
    "quantize_trained",
    "run_images",
    "static_qdq",
]

# Quantizing only the weight-heavy ops keeps Add / Mul / Softmax / LayerNorm in float32, where int8 costs accuracy
# (residual sums and attention probabilities) and saves little time.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")


def _float_nodes(proto: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    """Nodes kept in float32 although their type is quantized:

    - the first one (the stem conv or patch embedding, which reads the image itself) and depthwise / grouped convs:
      they hold a small share of the compute, so int8 saves little there, and they cost the most agreement;
    - MatMuls of two activations (attention's q·kᵀ and p·v): both sides would need a quantize step per call, for a
      small share of the FLOPs.
    The measurements behind both: docs/deployment.md, "int8".
    """
    weights = {t.name for t in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type not in op_types:
            continue
        grouped = node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
        two_activations = node.op_type == "MatMul" and not any(i in weights for i in node.input)
        if not names or grouped or two_activations:
            names.append(node.name)
    return [n for n in names if n]


@dataclass
class QuantizationReport:
    """An int8 file and its measured cost: top-1 agreement with the float32 file, and accuracy when labels exist."""

    path: Path
    written: bool
    size_bytes: int
    fp32_size_bytes: int
    calibration_images: int
    eval_name: str
    eval_images: int
    agreement: float
    min_agreement: float
    fp32_accuracy: float | None
    int8_accuracy: float | None
    seconds: float
    runtime: str = "ONNX"
    measure: str = "top-1"  # "exact label-set" for a multi-label model

    def __str__(self) -> str:
        acc = ""
        if self.fp32_accuracy is not None:
            acc = f"; accuracy fp32 {100 * self.fp32_accuracy:.2f}%, int8 {100 * self.int8_accuracy:.2f}%"
        verb = "written to" if self.written else "NOT written to"
        return (
            f"int8 {self.runtime} {verb} {self.path}: {self.size_bytes / 1e6:.1f} MB "
            f"({self.size_bytes / self.fp32_size_bytes:.2f} of fp32), calibrated on {self.calibration_images} images "
            f"in {self.seconds:.1f} s\n"
            f"int8 vs fp32 on {self.eval_name} ({self.eval_images} images): {self.measure} agreement "
            f"{100 * self.agreement:.2f}% (minimum {100 * self.min_agreement:.2f}%){acc}"
        )


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over a preprocessed batch, fed a few images at a time."""

    def __init__(self, images: Tensor, batch_size: int = 16) -> None:
        self.batches = [images[i : i + batch_size].numpy() for i in range(0, len(images), batch_size)]
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def decisions(logits: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
    """What a model decides from its logits (N, C): (N,) top-1 class indices; with `thresholds` (multi-label), (N, C)
    0 / 1 label sets, decided as `predict` decides them (`multilabel.label_sets`)."""
    if thresholds is None:
        return logits.argmax(1)
    return label_sets(logits, thresholds)[0].astype(np.int64)


def agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) per image of two `decisions`: the same class, or for label sets (N, C) the exact same set."""
    return a == b if a.ndim == 1 else (a == b).all(1)


def _predict(
    session: ort.InferenceSession, images: Tensor, batch_size: int = 32, thresholds: list[float] | None = None
) -> np.ndarray:
    """The `decisions` of an onnxruntime session on `images`."""
    logits = np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size].numpy()})[0]
            for i in range(0, len(images), batch_size)
        ]
    )
    return decisions(logits, thresholds)


def static_qdq(
    source: Path,
    output: Path,
    calibration: Tensor,
    float_nodes: list[str],
    op_types: tuple[str, ...] = INT8_OP_TYPES,
    activations: str = "QUInt8",
    quant_format: str = "QDQ",
) -> None:
    """onnxruntime's static quantization with our settings: per-channel int8 weights, `activations` (a `QuantType`
    name) calibrated by min-max on `calibration`, `float_nodes` left float32, in `quant_format` (a `QuantFormat`
    name). It writes a `-inferred.onnx` beside `source`: give it a file in a private folder."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(output),
        _CalibrationReader(calibration),
        quant_format=getattr(QuantFormat, quant_format),
        op_types_to_quantize=list(op_types),
        nodes_to_exclude=float_nodes,
        per_channel=True,
        # uint8 activations by default: onnxruntime's uint8 x int8 kernels were the faster ones on the CPUs measured,
        # at the same accuracy (docs/deployment.md, "int8").
        activation_type=getattr(QuantType, activations),
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quantize_int8(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: Tensor,
    evaluation: Tensor,
    labels: Tensor | None = None,
    *,
    eval_name: str = "the evaluation images",
    min_agreement: float = 0.99,
    op_types: tuple[str, ...] = INT8_OP_TYPES,
) -> QuantizationReport:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations calibrated by min-max) of an ONNX
    file written by `export_onnx`, written only when its top-1 agreement with the float32 file reaches
    `min_agreement` on `evaluation`. The first quantizable node, grouped convs and MatMuls of two activations stay
    float32 (`_float_nodes`).

    Args:
        fp32_path: the float32 file, kept as it is.
        output: the int8 file; replaced atomically, and left untouched when the agreement is too low.
        calibration: preprocessed images (N, C, H, W), real ones from the training data, to set activation ranges.
        evaluation: preprocessed images to compare the two files on.
        labels: the class index of each evaluation image (multi-label: (N, C) 0 / 1), for accuracies (multi-label:
            exact-match rates).
        eval_name: how the report names the evaluation images.
        min_agreement: the least share of evaluation images on which both files predict the same class (multi-label,
            when the float32 file's metadata has thresholds: the exact same label set).
        op_types: the ONNX op types to quantize.

    Returns:
        The report; `written` is False when the agreement was under `min_agreement`.

    Raises:
        VisionLoRAError: `fp32_path` is not a float32 vision_lora export.
    """
    metadata = read_onnx_metadata(fp32_path)
    if metadata.get("precision") != "float32":
        raise VisionLoRAError(
            f"{fp32_path} is {metadata.get('precision')}; int8 quantization starts from a float32 export."
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vision_lora_int8_") as tmp:
        # quantize_static writes a `-inferred.onnx` beside its input: work on a copy in a private folder.
        source, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        shutil.copyfile(fp32_path, source)
        float_nodes = _float_nodes(onnx.load(str(source)), op_types)
        static_qdq(source, quantized, calibration, float_nodes, op_types)
        settings = {
            "format": "QDQ",
            "weights": "int8, per channel",
            "activations": "uint8, min-max calibration",
            "op_types": list(op_types),
            "float_nodes": float_nodes,
            "calibration_images": len(calibration),
            "onnxruntime": ort.__version__,
        }
        proto = onnx.load(str(quantized))
        props = {p.key: p.value for p in proto.metadata_props}
        props.update({"precision": json.dumps("int8"), "quantization": json.dumps(settings)})
        onnx.helper.set_model_props(proto, props)
        onnx.save_model(proto, str(quantized))
        check_graph(proto)

        thresholds = metadata.get("thresholds") if metadata.get("task") == "multilabel" else None
        fp32_session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        fp32_top1 = _predict(fp32_session, evaluation, thresholds=thresholds)
        int8_session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        int8_top1 = _predict(int8_session, evaluation, thresholds=thresholds)
        agreement = float(agree(fp32_top1, int8_top1).mean())
        written = agreement >= min_agreement
        if written:
            atomic_write(output, lambda dst: shutil.copyfile(quantized, dst))
        size = quantized.stat().st_size
    accuracies = (None, None)
    if labels is not None:
        y = labels.numpy().astype(np.int64)
        accuracies = (float(agree(fp32_top1, y).mean()), float(agree(int8_top1, y).mean()))
    return QuantizationReport(
        path=Path(output),
        written=written,
        size_bytes=size,
        fp32_size_bytes=Path(fp32_path).stat().st_size,
        calibration_images=len(calibration),
        eval_name=eval_name,
        eval_images=len(evaluation),
        agreement=agreement,
        min_agreement=min_agreement,
        fp32_accuracy=accuracies[0],
        int8_accuracy=accuracies[1],
        seconds=time.perf_counter() - start,
        measure="top-1" if thresholds is None else "exact label-set",
    )


def run_images(
    trained: TrainedModel,
    *,
    data_root: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
    calib_split: str = "train",
    calib_images: int = 256,
) -> tuple[Tensor, Tensor, Tensor | None, str]:
    """The images int8 is calibrated and judged on: calibration from `calib_dir` or the `calib_split` of the data root
    (`data_root`, else the run's), evaluation on its labelled test split (else val; else the calibration images,
    without labels).

    Returns:
        (calibration, evaluation, labels or None, the evaluation images' name for the report).

    Raises:
        VisionLoRAError: no data root to take images from.
    """
    labels_file = (trained.data or {}).get("labels") if data_root is None else None
    if labels_file is not None:
        return _label_file_images(trained, labels_file, calib_dir, calib_split, calib_images)
    root = Path(data_root or trained.data_root) if (data_root or trained.data_root) else None
    if calib_dir is None:
        if root is None:
            raise VisionLoRAError("int8 calibration needs real images: give --calib_dir DIR or --data.root of the run.")
        calib_dir = root / calib_split
    calibration = readable_files(image_files(calib_dir, calib_images), trained.data_config)[1]
    split = next((root / s for s in ("test", "val") if root is not None and (root / s).is_dir()), None)
    if split is not None and trained.class_names:
        evaluation, targets = _labelled_batch(*labelled_images(split, trained.class_names), trained.data_config)
        return calibration, evaluation, targets, str(split)
    return calibration, calibration, None, f"the calibration images of {calib_dir}"


def _label_file_images(
    trained: TrainedModel, labels_file: str, calib_dir: str | os.PathLike | None, calib_split: str, calib_images: int
) -> tuple[Tensor, Tensor, Tensor | None, str]:
    """`run_images` for a run trained from a label file: its splits, as the run read them."""
    from ..data.labels import LabelFileSource

    data = trained.data or {}
    keys = ("root", "task", "classes", "label_sep", "allow_outside_root", "val_fraction", "seed")
    source = LabelFileSource(labels_file, **{k: data[k] for k in keys if data.get(k) is not None})
    if calib_dir is not None:
        calibration = readable_files(image_files(calib_dir, calib_images), trained.data_config)[1]
    else:
        paths = source.samples(calib_split)[0]
        spread = [paths[i * len(paths) // min(calib_images, len(paths))] for i in range(min(calib_images, len(paths)))]
        calibration = readable_files(spread, trained.data_config)[1]
    split = "test" if "test" in source.splits() else "val"
    evaluation, targets = _labelled_batch(*source.samples(split), trained.data_config)
    return calibration, evaluation, targets, f"{labels_file} {split}"


def _labelled_batch(paths: list[str], targets: list, data_config: dict) -> tuple[Tensor, Tensor]:
    """The preprocessed images that decode and their targets (a file that does not is skipped and named)."""
    kept, batch = readable_files(paths, data_config)
    return batch, torch.tensor([targets[i] for i in kept])


def check_agreement(report: QuantizationReport, fp32_path: str | os.PathLike) -> QuantizationReport:
    """`report`, or the error that says its int8 file was not written.

    Raises:
        VisionLoRAError: the agreement is under the minimum (the int8 file is then not written; `fp32_path` stays).
    """
    if not report.written:
        raise VisionLoRAError(
            f"{report}\nint8 agreement {100 * report.agreement:.2f}% is under --min_agreement "
            f"{100 * report.min_agreement:.2f}%: {report.path} was not written (the float32 model is {fp32_path})."
        )
    return report


def quantize_trained(
    trained: TrainedModel,
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
    calib_split: str = "train",
    calib_images: int = 256,
    min_agreement: float = 0.99,
) -> QuantizationReport:
    """`quantize_int8` with the images of a run (`run_images`).

    Raises:
        VisionLoRAError: no data root to take images from, or the agreement is under `min_agreement` (the int8 file is
            then not written; `fp32_path` stays).
    """
    images = run_images(
        trained, data_root=data_root, calib_dir=calib_dir, calib_split=calib_split, calib_images=calib_images
    )
    calibration, evaluation, labels, eval_name = images
    report = quantize_int8(
        fp32_path, output, calibration, evaluation, labels, eval_name=eval_name, min_agreement=min_agreement
    )
    return check_agreement(report, fp32_path)
