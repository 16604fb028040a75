"""OpenVINO as a second runtime: the verified ONNX export converted to an OpenVINO IR (model.xml + model.bin) with the
same input, output and metadata, checked against PyTorch; int8 through NNCF behind the same agreement gate as the
onnxruntime int8 (`deploy/int8.py`). Needs the [openvino] extra.

Telemetry: OpenVINO's model conversion and NNCF report usage through `openvino_telemetry`, which treats a missing
consent file as consent and then writes `~/intel/`. `openvino_module` hides that package before either is imported,
so both fall back to the no-op stubs they ship for when it is absent (`disable_telemetry`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from torch import Tensor, nn

from ..errors import VisionLoRAError, require
from .int8 import QuantizationReport, agree, decisions
from .onnx import (
    ExportReport,
    _allowed,
    _merged_copy,
    _reference_outputs,
    _resolve_data_config,
    export_onnx,
    read_onnx_metadata,
)

__all__ = [
    "RT_INFO_SECTION",
    "OpenVINOReport",
    "compile_openvino",
    "disable_telemetry",
    "export_openvino",
    "openvino_module",
    "quantize_openvino_int8",
    "read_openvino_metadata",
]

RT_INFO_SECTION = "vision_lora"  # our metadata: rt_info[RT_INFO_SECTION][key] = JSON string
_TELEMETRY = "openvino_telemetry"


def disable_telemetry() -> None:
    """Keep OpenVINO's converter and NNCF from sending usage data or writing `~/intel/` in this process.

    Both import `openvino_telemetry` inside `try: ... except ImportError` and use a no-op stub without it; marking it
    unimportable (`sys.modules[name] = None`) takes that path. If it was imported already (by the caller), its consent
    check is made to answer "declined", which is what a consent file holding "0" would do, without writing the file.
    """
    module = sys.modules.get(_TELEMETRY, None)
    if _TELEMETRY not in sys.modules:
        sys.modules[_TELEMETRY] = None  # type: ignore[assignment]
    elif module is not None:
        from openvino_telemetry.utils import opt_in_checker

        opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: opt_in_checker.ConsentCheckResult.DECLINED


def openvino_module() -> ModuleType:
    """`openvino`, with telemetry off.

    Raises:
        MissingExtraError: openvino is not installed; the message names the pip command.
    """
    disable_telemetry()
    return require("openvino", "openvino", "OpenVINO export and serving")


def compile_openvino(model, precision: str = "f32", threads: int | None = None, hint: str | None = None):
    """A model (a path or an `openvino.Model`) compiled for the CPU.

    Args:
        model: the IR's .xml path, or a model in memory.
        precision: OpenVINO's INFERENCE_PRECISION_HINT: "f32" computes in float32 (the precision the export is
            verified at); "bf16" / "f16" where the CPU has them; "default" leaves OpenVINO's choice for this CPU,
            which is bf16 on CPUs with AVX512-BF16 or AMX (see docs/deployment.md, "OpenVINO").
        threads: INFERENCE_NUM_THREADS; None lets OpenVINO choose.
        hint: PERFORMANCE_HINT ("LATENCY" or "THROUGHPUT"); None leaves OpenVINO's default.
    """
    ov = openvino_module()
    config: dict[str, object] = {}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if hint:
        config["PERFORMANCE_HINT"] = hint
    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(str(model))
    return core.compile_model(model, "CPU", config)


def _set_metadata(model, metadata: dict) -> None:
    for key, value in metadata.items():
        model.set_rt_info(json.dumps(value, ensure_ascii=False), [RT_INFO_SECTION, key])


def _metadata_of(model) -> dict:
    if not model.has_rt_info([RT_INFO_SECTION]):
        return {}
    keys = model.get_rt_info()[RT_INFO_SECTION]
    return {str(k): json.loads(model.get_rt_info([RT_INFO_SECTION, str(k)]).astype(str)) for k in keys}


def read_openvino_metadata(path: str | os.PathLike) -> dict:
    """The metadata `export_openvino` stored in an IR (.xml), JSON values decoded.

    Raises:
        FileNotFoundError: no .xml file at `path`, or no .bin beside it.
        VisionLoRAError: the file was not written by `export_openvino`.
    """
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path} (and its .bin beside it) not found; pass the .xml written by export_openvino.")
    try:
        model = openvino_module().Core().read_model(str(path))
    except RuntimeError as err:
        raise VisionLoRAError(f"{path} is not an OpenVINO IR ({str(err).splitlines()[0]}).") from None
    metadata = _metadata_of(model)
    if "vision_lora_version" not in metadata:
        raise VisionLoRAError(f"{path} has no vision_lora metadata; it was not written by vision_lora.export_openvino.")
    return metadata


def _staging(output: Path) -> tempfile.TemporaryDirectory:
    """A private folder beside `output`, where an IR is written and checked before `_move_into_place`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent)


def _move_into_place(staged: Path, output: Path) -> None:
    """Rename a staged .xml + .bin to `output`: the .bin first, the .xml last, so that a reader never finds the new
    .xml with the old weights (an interruption in between leaves the old .xml with the new .bin)."""
    os.replace(staged.with_suffix(".bin"), output.with_suffix(".bin"))
    os.replace(staged, output)


def _ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


@dataclass
class OpenVINOReport:
    """An IR written by `export_openvino`: the ONNX export it was converted from, and how closely OpenVINO (float32
    inference precision) reproduces the PyTorch model: max |logit difference| by batch size (and "images")."""

    path: Path
    size_bytes: int
    weights: str
    onnx: ExportReport
    tolerance: float
    max_abs_diff: dict
    max_abs_logit: float
    top1_agreement: float
    seconds: float

    def __str__(self) -> str:
        diffs = ", ".join(
            f"{d:.2e} ({'images' if b == 'images' else f'batch {b}'})" for b, d in self.max_abs_diff.items()
        )
        # The ONNX file may have been a temporary one: its verification lines are what the IR was converted from.
        onnx_lines = "\n".join(str(self.onnx).splitlines()[1:])
        return (
            f"{onnx_lines}\n"
            f"OpenVINO IR written to {self.path} (+ .bin): {self.size_bytes / 1e6:.1f} MB, {self.weights} weights, "
            f"converted and verified in {self.seconds:.1f} s\n"
            f"OpenVINO (f32 inference precision) vs PyTorch: max |diff| {diffs} (largest |logit| "
            f"{self.max_abs_logit:.3g}); top-1 agreement {100 * self.top1_agreement:.1f}% "
            f"(tolerance {self.tolerance:g})"
        )


def export_openvino(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    model_name: str | None = None,
    data_config: dict | None = None,
    fp16: bool = False,
    images: Tensor | None = None,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    fp16_atol: float = 5e-2,
    onnx_output: str | os.PathLike | None = None,
    thresholds: list[float] | None = None,
) -> OpenVINOReport:
    """Merge LoRA, export ONNX (`export_onnx`, verified in onnxruntime), convert it to an OpenVINO IR whose rt_info
    holds the same metadata, and write it once OpenVINO, in float32, reproduces PyTorch.

    Args:
        model: the model, LoRA merged or not; it is not modified.
        output: the .xml to write; the weights go to the .bin beside it.
        class_names: the label of each output index.
        model_name: the timm model name recorded as "backbone".
        data_config: overrides of timm's data config of the model (see `export_onnx`).
        fp16: store the weights in float16 (half the file; OpenVINO computes in the inference precision it is
            compiled with, float32 unless asked otherwise).
        images: a preprocessed batch (N, C, H, W) to verify on as well as the random inputs.
        batch_sizes: the batch sizes of the random verification inputs.
        atol: the largest logit difference accepted with float32 weights, for logits up to 1 in magnitude; it scales
            with the largest reference logit above that.
        fp16_atol: the same, for `fp16` weights.
        onnx_output: also keep the verified float32 ONNX file here (by default it is a temporary file).
        thresholds: the per-class probability thresholds of a multi-label model, recorded as `export_onnx` does.

    Returns:
        The report; `str(report)` is printable.

    Raises:
        VisionLoRAError: `output` is not an .xml path, the export does not verify (nothing is written then), or
            anything `export_onnx` refuses.
    """
    ov = openvino_module()
    output = Path(output)
    if output.suffix != ".xml":
        raise VisionLoRAError(f"An OpenVINO IR is an .xml file (with a .bin beside it); got --output {output}.")
    cfg = _resolve_data_config(model, data_config, images)
    inputs, references = _reference_outputs(_merged_copy(model), cfg["input_size"], tuple(batch_sizes), images)
    with tempfile.TemporaryDirectory(prefix="vision_lora_openvino_") as tmp:
        onnx_path = Path(onnx_output) if onnx_output else Path(tmp) / "model.onnx"
        onnx_report = export_onnx(
            model,
            onnx_path,
            class_names=class_names,
            model_name=model_name,
            data_config=data_config,
            images=images,
            batch_sizes=batch_sizes,
            thresholds=thresholds,
        )
        start = time.perf_counter()
        metadata = {**read_onnx_metadata(onnx_path), "precision": "float32", "runtime": "openvino"}
        if fp16:
            metadata["weights"] = "float16"
        converted = ov.convert_model(str(onnx_path))
        _set_metadata(converted, metadata)
        with _staging(output) as folder:
            staged = Path(folder) / output.name
            ov.save_model(converted, str(staged), compress_to_fp16=fp16)
            diffs, agree = _verify_ir(staged, metadata, inputs, references, fp16_atol if fp16 else atol, output)
            _move_into_place(staged, output)
    return OpenVINOReport(
        path=output,
        size_bytes=_ir_bytes(output),
        weights="float16" if fp16 else "float32",
        onnx=onnx_report,
        tolerance=fp16_atol if fp16 else atol,
        max_abs_diff=diffs,
        max_abs_logit=max(float(r.abs().max()) for r in references.values()),
        top1_agreement=float(np.concatenate(agree).mean()),
        seconds=time.perf_counter() - start,
    )


def _verify_ir(
    staged: Path, metadata: dict, inputs: dict, references: dict, tolerance: float, output: Path
) -> tuple[dict, list]:
    """Read the staged IR back, check its metadata, and run it in float32 inference precision on each input.

    Raises:
        VisionLoRAError: a logit difference over the tolerance.
    """
    ov = openvino_module()
    written = ov.Core().read_model(str(staged))
    if _metadata_of(written) != metadata:
        raise RuntimeError("The IR's rt_info does not round-trip the metadata that was set.")
    compiled = compile_openvino(written, "f32")
    diffs, agree, failures = {}, [], []
    for key, x in inputs.items():
        out, ref = compiled(x.numpy())[0], references[key].numpy()
        diffs[key] = float(np.abs(out - ref).max()) if np.isfinite(out).all() else float("inf")
        agree.append(out.argmax(1) == ref.argmax(1))
        if not diffs[key] <= _allowed(tolerance, ref):  # `not <=` also catches NaN
            failures.append(f"{diffs[key]:.3g} " + ("on the given images" if key == "images" else f"at batch {key}"))
    if failures:
        raise VisionLoRAError(
            f"OpenVINO {ov.get_version()} logits differ from PyTorch by {', '.join(failures)}, over the tolerance "
            f"{tolerance:g} (scaled by the largest logit above 1); nothing was written to {output}."
        )
    return diffs, agree


def _model_type(model, nncf: ModuleType):
    """NNCF's transformer scheme (which keeps attention's softmax paths accurate) for graphs with a Softmax."""
    ops = {op.get_type_name() for op in model.get_ops()}
    return nncf.ModelType.TRANSFORMER if "Softmax" in ops else None


def _decisions(compiled, images: Tensor, thresholds: list[float] | None, batch_size: int = 32) -> np.ndarray:
    """The `decisions` of a compiled model on `images`."""
    logits = np.concatenate(
        [compiled(images[i : i + batch_size].numpy())[0] for i in range(0, len(images), batch_size)]
    )
    return decisions(logits, thresholds)


def quantize_openvino_int8(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: Tensor,
    evaluation: Tensor,
    labels: Tensor | None = None,
    *,
    eval_name: str = "the evaluation images",
    min_agreement: float = 0.99,
) -> QuantizationReport:
    """Post-training int8 quantization of a float32 IR with NNCF (`nncf.quantize`: int8 weights and activations,
    ranges from `calibration`), written only when its agreement with the float32 IR on `evaluation` (top-1; a
    multi-label IR: exact label sets at its thresholds) reaches `min_agreement`; both are run in float32 inference
    precision for the comparison.

    Args:
        fp32_path: the float32 IR written by `export_openvino`, kept as it is.
        output: the int8 .xml (and .bin); left untouched when the agreement is too low.
        calibration: preprocessed images (N, C, H, W), real ones from the training data.
        evaluation: preprocessed images to compare the two models on.
        labels: the class index of each evaluation image (multi-label: (N, C) 0 / 1), for accuracies (multi-label:
            exact-match rates).
        eval_name: how the report names the evaluation images.
        min_agreement: the least share of evaluation images on which both predict the same class (multi-label: the
            exact same label set).

    Returns:
        The report; `written` is False when the agreement was under `min_agreement`.

    Raises:
        VisionLoRAError: `fp32_path` is not a float32 vision_lora IR, or `output` is not an .xml path.
    """
    ov = openvino_module()
    nncf = require("nncf", "openvino", "OpenVINO int8 quantization")
    output = Path(output)
    if output.suffix != ".xml":
        raise VisionLoRAError(f"An OpenVINO IR is an .xml file (with a .bin beside it); got --output {output}.")
    metadata = read_openvino_metadata(fp32_path)
    if metadata.get("precision") != "float32" or metadata.get("weights") == "float16":
        raise VisionLoRAError(f"{fp32_path} is not a float32 IR; int8 quantization starts from a float32 export.")
    start = time.perf_counter()
    model = ov.Core().read_model(str(fp32_path))
    batches = [calibration[i : i + 16].numpy() for i in range(0, len(calibration), 16)]
    model_type = _model_type(model, nncf)
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), model_type=model_type)
    settings = {
        "tool": "nncf.quantize",
        "nncf": nncf.__version__,
        "openvino": ov.get_version(),
        "preset": "performance (symmetric int8 weights and activations)",
        "model_type": "transformer" if model_type is not None else "default",
        "calibration_images": len(calibration),
    }
    _set_metadata(quantized, {**metadata, "precision": "int8", "quantization": settings})
    thresholds = metadata.get("thresholds") if metadata.get("task") == "multilabel" else None
    fp32_top1 = _decisions(compile_openvino(model, "f32"), evaluation, thresholds)
    int8_top1 = _decisions(compile_openvino(quantized, "f32"), evaluation, thresholds)
    agreement = float(agree(fp32_top1, int8_top1).mean())
    written = agreement >= min_agreement
    with _staging(output) as folder:
        staged = Path(folder) / output.name
        ov.save_model(quantized, str(staged), compress_to_fp16=False)
        size = _ir_bytes(staged)
        if written:
            _move_into_place(staged, output)
    accuracies = (None, None)
    if labels is not None:
        y = labels.numpy().astype(np.int64)
        accuracies = (float(agree(fp32_top1, y).mean()), float(agree(int8_top1, y).mean()))
    return QuantizationReport(
        path=output,
        written=written,
        size_bytes=size,
        fp32_size_bytes=_ir_bytes(Path(fp32_path)),
        calibration_images=len(calibration),
        eval_name=eval_name,
        eval_images=len(evaluation),
        agreement=agreement,
        min_agreement=min_agreement,
        fp32_accuracy=accuracies[0],
        int8_accuracy=accuracies[1],
        seconds=time.perf_counter() - start,
        runtime="OpenVINO IR",
        measure="top-1" if thresholds is None else "exact label-set",
    )
