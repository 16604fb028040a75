"""Merged model -> ONNX with a dynamic batch axis and preprocessing metadata, verified in onnxruntime before use.

The graph is traced from a merged, eval-mode, float32 copy of the model with the dynamo-based `torch.onnx.export`,
the batch axis declared dynamic, then optimized by onnxscript. A forward that depends on the batch size is silently
traced with a fixed one, so the written file is checked for a symbolic batch dimension and run at other batch sizes.
With `fp16=True` the traced model is that copy cast to float16 behind a float32 interface: one Cast after the input
and one before the output, so callers feed and read float32 whatever the precision.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from .. import __version__
from .._io import atomic_write, package_versions
from .._io import model_name as timm_model_name
from ..errors import VisionLoRAError
from ..lora.inject import lora_layers, merge_lora
from ..preprocess import complete_data_config, data_config_record, resolve_data_config

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportReport", "check_graph", "export_onnx", "read_onnx_metadata"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The example batch the graph is traced with; torch.export specialises a size-1 dimension to a constant.
_EXPORT_BATCH = 2
# Below 18 the dynamo exporter silently writes opset 18 instead (its version converter fails on these graphs).
_MIN_OPSET = 18
# A single-file ONNX model is a protobuf, which cannot exceed 2 GiB; keep headroom for the graph itself.
_MAX_WEIGHT_BYTES = 2**31 - 2**26
_FLOAT16_MAX = 65504.0


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime reproduces the PyTorch model.

    Differences are max |logit_onnxruntime - logit_pytorch| against the merged float32 PyTorch model; `tolerance` is
    the `atol` (or `fp16_atol`) the export was checked against, applied to logits up to 1 in magnitude and scaled by
    the largest reference logit above that.
    """

    path: Path
    size_bytes: int
    export_seconds: float
    verify_seconds: float
    num_params: int
    opset: int
    precision: str
    tolerance: float
    max_abs_diff: dict[int, float]
    top1_agreement: float
    images_max_abs_diff: float | None = None
    images_top1_agreement: float | None = None

    def __str__(self) -> str:
        diffs = ", ".join(f"{d:.2e} (batch {b})" for b, d in self.max_abs_diff.items())
        lines = [
            f"ONNX written to {self.path}: {self.size_bytes / 1e6:.1f} MB, {self.precision}, opset {self.opset}, "
            f"{self.num_params:,} parameters; exported in {self.export_seconds:.1f} s, verified in "
            f"{self.verify_seconds:.1f} s",
            f"onnxruntime vs PyTorch on random inputs: max |diff| {diffs}; top-1 agreement "
            f"{100 * self.top1_agreement:.1f}% (tolerance {self.tolerance:g})",
        ]
        if self.images_max_abs_diff is not None:
            lines.append(
                f"onnxruntime vs PyTorch on the given images: max |diff| {self.images_max_abs_diff:.2e}; top-1 "
                f"agreement {100 * self.images_top1_agreement:.1f}%"
            )
        return "\n".join(lines)


class _Float16Graph(nn.Module):
    """`model` in float16 behind a float32 input and output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.half()).float()


def _merged_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode with every LoRA update merged and the original timm modules back."""
    merged = merge_lora(copy.deepcopy(model).to("cpu", torch.float32)).eval().requires_grad_(False)
    if lora_layers(merged) or any("lora_" in n for n, _ in merged.named_parameters()):
        raise RuntimeError("merge_lora left LoRA parameters in the model; the export would not be the plain model.")
    return merged


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError) as err:
        raise VisionLoRAError(
            f"The model fails on inputs of shape {tuple(x.shape)} ({err}); set data_config['input_size'] to a size "
            f"the model accepts, and make its forward work at any batch size."
        ) from err
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise VisionLoRAError("The model must return a logits tensor of shape (N, num_classes) in eval mode.")
    return out


def _dynamic_shapes() -> tuple:
    """The dynamic axes of the forward's arguments: the batch axis of the image tensor."""
    return ({0: torch.export.Dim("batch", min=1)},)


def _trace(model: nn.Module, example: Tensor, opset: int) -> torch.onnx.ONNXProgram:
    """The unoptimized ONNX program of `model` (initializers still named after its parameters)."""
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=_dynamic_shapes(),
        dynamo=True,
        optimize=False,
        verbose=False,
    )
    written = program.model.opset_imports.get("")
    if written != opset:
        raise VisionLoRAError(
            f"torch.onnx {torch.__version__} cannot write opset {opset} for this model (it wrote {written}); "
            f"choose opset={written} or another version it supports."
        )
    return program


def _graph_params(program: torch.onnx.ONNXProgram, model: nn.Module) -> int:
    """The number of parameters the traced graph holds, checked to be exactly `model`'s and free of LoRA weights."""
    params = {n: p.numel() for n, p in model.named_parameters()}
    initializers = program.model.graph.initializers
    lora = [n for n in initializers if "lora_" in n]
    if lora:
        raise RuntimeError(f"The exported graph holds LoRA weights {lora[:3]}; the model was not merged.")
    held = {n: math.prod(v.shape) for n, v in initializers.items() if n in params}
    wrong = [n for n, size in held.items() if size != params[n]]
    if wrong:
        raise RuntimeError(f"Graph weights {wrong[:3]} do not have the size of the model parameters of that name.")
    # A parameter the forward never uses is dropped from the graph, so `held` may be a subset of `params`.
    return sum(held.values())


def _to_proto(program: torch.onnx.ONNXProgram, metadata: dict) -> onnx.ModelProto:
    """The optimized model with `metadata` as JSON-encoded `metadata_props`."""
    program.optimize()
    proto = program.model_proto
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({k: json.dumps(v, ensure_ascii=False) for k, v in metadata.items()})
    onnx.helper.set_model_props(proto, props)
    return proto


def check_graph(proto: onnx.ModelProto) -> None:
    """Raise unless `proto` is a valid model with one input and one output named as exported, both batch-dynamic."""
    onnx.checker.check_model(proto)
    inputs, outputs = proto.graph.input, proto.graph.output
    if [v.name for v in inputs] != [INPUT_NAME] or [v.name for v in outputs] != [OUTPUT_NAME]:
        raise RuntimeError(
            f"The exported graph has inputs {[v.name for v in inputs]} and outputs {[v.name for v in outputs]}, "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]."
        )
    for value in (*inputs, *outputs):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise VisionLoRAError(
                f"The exported graph's {value.name!r} has a fixed batch dimension of {dim.dim_value}, so it would "
                f"reject any other batch size. Make the model's forward independent of the batch size (no "
                f"hard-coded batch in reshapes, no Python branch on it) and export again."
            )


def _allowed(tolerance: float, reference: np.ndarray) -> float:
    # Float error is relative: the tolerance holds for logits up to 1 and grows with the largest one beyond that.
    return tolerance * max(1.0, float(np.abs(reference).max()))


def _compare(session: ort.InferenceSession, x: Tensor, reference: Tensor) -> tuple[float, np.ndarray]:
    """Max abs logit difference (inf when onnxruntime gives non-finite values) and per-row top-1 agreement."""
    try:
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    except Exception as err:  # onnxruntime's own exception types
        raise VisionLoRAError(
            f"onnxruntime cannot run the exported graph on a batch of {len(x)} ({err}); the model's forward likely "
            f"depends on the batch size it was traced at. Make it batch-independent and export again."
        ) from err
    ref = reference.numpy()
    if out.shape != ref.shape:
        raise VisionLoRAError(
            f"onnxruntime returns logits of shape {out.shape} where PyTorch returns {ref.shape}; the model's forward "
            f"likely depends on the batch size it was traced at. Make it batch-independent and export again."
        )
    diff = float(np.abs(out - ref).max()) if np.isfinite(out).all() else math.inf
    return diff, out.argmax(1) == ref.argmax(1)


def _verify(
    path: str, inputs: dict, references: dict, tolerance: float, fp16: bool, output: str | os.PathLike
) -> tuple[dict, dict]:
    """Check the ONNX file at `path` and run it in onnxruntime on each input of `inputs` (keyed by batch size, or
    "images"): the max abs logit difference from `references` and the per-row top-1 agreement, by the same keys.

    Raises:
        VisionLoRAError: a fixed batch dimension, a graph onnxruntime cannot load, or a difference over the tolerance.
    """
    check_graph(onnx.load(path))
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types, e.g. for an unsupported opset
        raise VisionLoRAError(
            f"onnxruntime {ort.__version__} cannot load the exported graph ({err}); try opset={_MIN_OPSET}."
        ) from err
    diffs, agree, failures = {}, {}, []
    for key, x in inputs.items():
        diffs[key], agree[key] = _compare(session, x, references[key])
        if not diffs[key] <= _allowed(tolerance, references[key].numpy()):  # `not <=` also catches NaN
            failures.append(f"{diffs[key]:.3g} " + ("on the given images" if key == "images" else f"at batch {key}"))
    if failures:
        hint = "raise fp16_atol or export in float32" if fp16 else "try another opset or report the model"
        raise VisionLoRAError(
            f"onnxruntime logits differ from PyTorch by {', '.join(failures)}, over the tolerance {tolerance:g} "
            f"(scaled by the largest logit when it exceeds 1); nothing was written to {output}. {hint}."
        )
    return diffs, agree


def _check_arguments(opset: int, batch_sizes: tuple[int, ...]) -> tuple[int, ...]:
    if opset < _MIN_OPSET:
        raise VisionLoRAError(
            f"opset must be >= {_MIN_OPSET} (the lowest the torch.onnx dynamo exporter writes), got {opset}."
        )
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise VisionLoRAError(f"batch_sizes must be positive batch sizes such as (1, 3), got {batch_sizes}.")
    if all(b == _EXPORT_BATCH for b in batch_sizes):
        raise VisionLoRAError(
            f"batch_sizes must include a size other than {_EXPORT_BATCH}, the one the graph is traced at."
        )
    return batch_sizes


def _resolve_data_config(model: nn.Module, data_config: dict | None, images: Tensor | None) -> dict:
    """timm's data config of `model` with `data_config` on top, completed, its input_size checked against `images`."""
    cfg = complete_data_config({**resolve_data_config(model), **(data_config or {})})
    input_size = cfg["input_size"]
    if images is not None and (images.ndim != 4 or tuple(images.shape[1:]) != input_size):
        raise VisionLoRAError(
            f"images must be a preprocessed batch of shape (N, {', '.join(map(str, input_size))}), got "
            f"{tuple(images.shape)}; preprocess them with the same data config."
        )
    return cfg


def _reference_outputs(
    merged: nn.Module, input_size: tuple[int, ...], batch_sizes: tuple[int, ...], images: Tensor | None
) -> tuple[dict, dict]:
    """Verification inputs (random batches keyed by batch size, and "images") and PyTorch's logits for each."""
    generator = torch.Generator().manual_seed(0)
    inputs: dict[int | str, Tensor] = {b: torch.randn(b, *input_size, generator=generator) for b in batch_sizes}
    if images is not None:
        inputs["images"] = images.detach().to("cpu", torch.float32)
    return inputs, {key: _logits(merged, x) for key, x in inputs.items()}


def _graph_model(merged: nn.Module, fp16: bool) -> nn.Module:
    """What is traced: `merged`, or its float16 copy behind a float32 interface; refuses files ONNX cannot hold."""
    weight_bytes = sum(t.numel() for t in (*merged.parameters(), *merged.buffers())) * (2 if fp16 else 4)
    if weight_bytes > _MAX_WEIGHT_BYTES:
        raise VisionLoRAError(
            f"The model's weights take {weight_bytes / 2**30:.1f} GiB, more than a single-file ONNX model can hold "
            f"(2 GiB); export a smaller model{'' if fp16 else ' or use fp16=True'}."
        )
    if not fp16:
        return merged
    too_large = [n for n, t in merged.state_dict().items() if t.is_floating_point() and t.abs().max() > _FLOAT16_MAX]
    if too_large:
        raise VisionLoRAError(f"Weights {too_large[:3]} exceed the float16 range (65504); export with fp16=False.")
    return _Float16Graph(merged).eval()


def _metadata(cfg: dict, name: str, class_names: list[str] | None, num_classes: int, fp16: bool, opset: int) -> dict:
    """What the file records: preprocessing, classes and provenance (read back by `read_onnx_metadata`); a
    multi-label export adds "task" and its per-class "thresholds" (`export_onnx`)."""
    return {
        "class_names": class_names,
        "num_classes": num_classes,
        **data_config_record(cfg),
        "backbone": name,
        "precision": "float16" if fp16 else "float32",
        "vision_lora_version": package_versions().get("vision-lora", __version__),
        "opset": opset,
    }


def _write_verified(
    proto: onnx.ModelProto, output: str | os.PathLike, inputs: dict, references: dict, tolerance: float, fp16: bool
) -> tuple[dict, dict, float]:
    """Write `proto` to `output` atomically, only once onnxruntime reproduces `references` on `inputs`.

    Returns:
        The max abs differences and per-row top-1 agreement by input key, and the seconds writing and checking took.
    """
    result = {}

    def write(tmp: str) -> None:
        begin = time.perf_counter()
        onnx.save_model(proto, tmp)
        result["diffs"], result["agree"] = _verify(tmp, inputs, references, tolerance, fp16, output)
        result["seconds"] = time.perf_counter() - begin

    atomic_write(output, write)
    return result["diffs"], result["agree"], result["seconds"]


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    model_name: str | None = None,
    data_config: dict | None = None,
    opset: int = 18,
    fp16: bool = False,
    images: Tensor | None = None,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    # float16 rounds every activation to 11 significant bits, so logit errors grow with depth; 5% of the logit scale
    # still catches wrong weights, overflow or a broken cast, which move logits by their own magnitude (the measured
    # errors: docs/deployment.md, "Tolerances and settings").
    fp16_atol: float = 5e-2,
    thresholds: list[float] | None = None,
) -> ExportReport:
    """Export a timm classifier, with or without LoRA, as an ONNX file with a dynamic batch axis, verified against
    the PyTorch model in onnxruntime before it is written.

    The caller's model is left untouched: a copy is merged, put in eval mode and exported in float32 (or float16
    weights and compute behind a float32 input and output with `fp16`). The graph takes "input" (N, C, H, W) at
    the data config's input size and returns "logits" (N, num_classes); the preprocessing settings, class names and
    provenance are stored as JSON `metadata_props` (see `read_onnx_metadata`).

    Args:
        model: a timm classifier, plain, LoRA-adapted or merged, in any mode.
        output: the .onnx file; replaced atomically and only once verification passes.
        class_names: the label of each output index.
        model_name: the timm model name recorded as "backbone"; by default `model.pretrained_cfg["architecture"]`.
        data_config: overrides of timm's data config of the model (input_size, mean, std,
            interpolation, crop_pct, crop_mode); the graph's height and width are fixed to its input_size.
        opset: ONNX opset version, 18 or newer.
        fp16: write float16 weights and compute.
        images: a preprocessed batch (N, C, H, W) to verify on as well as the random inputs.
        batch_sizes: the batch sizes of the random verification inputs; at least one must differ from the traced
            batch size, 2.
        atol: the largest logit difference accepted in float32, for logits up to 1 in magnitude; it scales with the
            largest reference logit above that.
        fp16_atol: the same, for `fp16`.
        thresholds: the per-class probability thresholds of a multi-label model (sigmoid of the logits); recorded
            with `"task": "multilabel"`.

    Returns:
        The report of the written file and its agreement with PyTorch; `str(report)` is printable.

    Raises:
        VisionLoRAError: a bad argument, a model that does not run at the input size or has no architecture name, a
            graph with a fixed batch dimension, or onnxruntime logits further from PyTorch than the tolerance. The
            output file is not written then.
    """
    batch_sizes = _check_arguments(opset, batch_sizes)
    name = model_name or timm_model_name(model)
    cfg = _resolve_data_config(model, data_config, images)
    merged = _merged_copy(model)
    inputs, references = _reference_outputs(merged, cfg["input_size"], batch_sizes, images)
    num_classes = references[batch_sizes[0]].shape[1]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise VisionLoRAError(f"{len(class_names)} class names given for a model with {num_classes} outputs.")
    graph_model = _graph_model(merged, fp16)
    metadata = _metadata(cfg, name, class_names, num_classes, fp16, opset)
    if thresholds is not None:
        if len(thresholds) != num_classes:
            raise VisionLoRAError(f"{len(thresholds)} thresholds given for a model with {num_classes} outputs.")
        metadata.update(task="multilabel", thresholds=[float(t) for t in thresholds])

    start = time.perf_counter()
    example = torch.randn(_EXPORT_BATCH, *cfg["input_size"], generator=torch.Generator().manual_seed(1))
    program = _trace(graph_model, example, opset)
    num_params = _graph_params(program, graph_model)
    proto = _to_proto(program, metadata)
    export_seconds = time.perf_counter() - start
    del program

    tolerance = fp16_atol if fp16 else atol
    diffs, agree, verify_seconds = _write_verified(proto, output, inputs, references, tolerance, fp16)
    path = Path(output)
    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        export_seconds=export_seconds,
        num_params=num_params,
        opset=opset,
        precision=metadata["precision"],
        tolerance=tolerance,
        verify_seconds=verify_seconds,
        max_abs_diff={b: diffs[b] for b in batch_sizes},
        top1_agreement=float(np.concatenate([agree[b] for b in batch_sizes]).mean()),
        images_max_abs_diff=diffs.get("images"),
        images_top1_agreement=float(agree["images"].mean()) if "images" in agree else None,
    )


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata `export_onnx` stored in an ONNX file, JSON values decoded (other producers' strings kept as is).

    Raises:
        FileNotFoundError: no file at `path`.
        VisionLoRAError: the file was not written by `export_onnx`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the .onnx file written by export_onnx.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise VisionLoRAError(f"{path} is not an ONNX file ({type(err).__name__}).") from None
    out = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    if "vision_lora_version" not in out:
        raise VisionLoRAError(f"{path} has no vision_lora metadata; it was not written by vision_lora.export_onnx.")
    return out
