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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from torch import Tensor, nn

from . import __version__
from ._io import atomic_write, package_versions
from ._io import model_name as timm_model_name
from .data import image_files as data_image_files
from .data import load_rgb
from .inject import lora_layers, merge_lora
from .preprocess import eval_transform
from .weights import create_backbone

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportReport",
    "QuantizationReport",
    "TrainedModel",
    "export_onnx",
    "image_files",
    "labelled_images",
    "load_model",
    "preprocess_files",
    "quantize_int8",
    "quantize_trained",
    "read_onnx_metadata",
]

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
        raise ValueError(
            f"The model fails on inputs of shape {tuple(x.shape)} ({err}); set data_config['input_size'] to a size "
            f"the model accepts, and make its forward work at any batch size."
        ) from err
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise ValueError("The model must return a logits tensor of shape (N, num_classes) in eval mode.")
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
        raise ValueError(
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


def _check_graph(proto: onnx.ModelProto) -> None:
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
            raise ValueError(
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
        raise ValueError(
            f"onnxruntime cannot run the exported graph on a batch of {len(x)} ({err}); the model's forward likely "
            f"depends on the batch size it was traced at. Make it batch-independent and export again."
        ) from err
    ref = reference.numpy()
    if out.shape != ref.shape:
        raise ValueError(
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
        ValueError: a fixed batch dimension, a graph onnxruntime cannot load, or a difference over the tolerance.
    """
    _check_graph(onnx.load(path))
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types, e.g. for an unsupported opset
        raise ValueError(
            f"onnxruntime {ort.__version__} cannot load the exported graph ({err}); try opset={_MIN_OPSET}."
        ) from err
    diffs, agree, failures = {}, {}, []
    for key, x in inputs.items():
        diffs[key], agree[key] = _compare(session, x, references[key])
        if not diffs[key] <= _allowed(tolerance, references[key].numpy()):  # `not <=` also catches NaN
            failures.append(f"{diffs[key]:.3g} " + ("on the given images" if key == "images" else f"at batch {key}"))
    if failures:
        hint = "raise fp16_atol or export in float32" if fp16 else "try another opset or report the model"
        raise ValueError(
            f"onnxruntime logits differ from PyTorch by {', '.join(failures)}, over the tolerance {tolerance:g} "
            f"(scaled by the largest logit when it exceeds 1); nothing was written to {output}. {hint}."
        )
    return diffs, agree


def _check_arguments(opset: int, batch_sizes: tuple[int, ...]) -> tuple[int, ...]:
    if opset < _MIN_OPSET:
        raise ValueError(
            f"opset must be >= {_MIN_OPSET} (the lowest the torch.onnx dynamo exporter writes), got {opset}."
        )
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive batch sizes such as (1, 3), got {batch_sizes}.")
    if all(b == _EXPORT_BATCH for b in batch_sizes):
        raise ValueError(f"batch_sizes must include a size other than {_EXPORT_BATCH}, the one the graph is traced at.")
    return batch_sizes


def _resolve_data_config(model: nn.Module, data_config: dict | None, images: Tensor | None) -> dict:
    """timm's data config of `model` with `data_config` on top, its input_size checked against `images`."""
    cfg = {**timm.data.resolve_model_data_config(model), **(data_config or {})}
    input_size = tuple(int(s) for s in cfg["input_size"])
    if len(input_size) != 3:
        raise ValueError(f"data_config['input_size'] must be (channels, height, width), got {cfg['input_size']}.")
    if images is not None and (images.ndim != 4 or tuple(images.shape[1:]) != input_size):
        raise ValueError(
            f"images must be a preprocessed batch of shape (N, {', '.join(map(str, input_size))}), got "
            f"{tuple(images.shape)}; preprocess them with the same data config."
        )
    return {**cfg, "input_size": input_size}


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
        raise ValueError(
            f"The model's weights take {weight_bytes / 2**30:.1f} GiB, more than a single-file ONNX model can hold "
            f"(2 GiB); export a smaller model{'' if fp16 else ' or use fp16=True'}."
        )
    if not fp16:
        return merged
    too_large = [n for n, t in merged.state_dict().items() if t.is_floating_point() and t.abs().max() > _FLOAT16_MAX]
    if too_large:
        raise ValueError(f"Weights {too_large[:3]} exceed the float16 range (65504); export with fp16=False.")
    return _Float16Graph(merged).eval()


def _metadata(cfg: dict, name: str, class_names: list[str] | None, num_classes: int, fp16: bool, opset: int) -> dict:
    """What the file records: preprocessing, classes and provenance (read back by `read_onnx_metadata`)."""
    return {
        "class_names": class_names,
        "num_classes": num_classes,
        "input_size": list(cfg["input_size"]),
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": cfg.get("crop_mode", "center"),
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
    # float16 keeps 11 significant bits (unit roundoff 4.9e-4) and every activation is rounded to it, so logit errors
    # grow with depth: measured 0.1% of the logit scale on test_vit / test_resnet and 0.5-0.9% on a random-weight
    # tf_efficientnet_lite0 at 224 px. 5% leaves room for deeper models while still catching wrong weights, overflow
    # (inf / NaN) or a broken cast, which move logits by about their own magnitude.
    fp16_atol: float = 5e-2,
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
        data_config: overrides of `timm.data.resolve_model_data_config(model)` (input_size, mean, std,
            interpolation, crop_pct, crop_mode); the graph's height and width are fixed to its input_size.
        opset: ONNX opset version, 18 or newer.
        fp16: write float16 weights and compute.
        images: a preprocessed batch (N, C, H, W) to verify on as well as the random inputs.
        batch_sizes: the batch sizes of the random verification inputs; at least one must differ from the traced
            batch size, 2.
        atol: the largest logit difference accepted in float32, for logits up to 1 in magnitude; it scales with the
            largest reference logit above that.
        fp16_atol: the same, for `fp16`.

    Returns:
        The report of the written file and its agreement with PyTorch; `str(report)` is printable.

    Raises:
        ValueError: a bad argument, a model that does not run at the input size or has no architecture name, a
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
            raise ValueError(f"{len(class_names)} class names given for a model with {num_classes} outputs.")
    graph_model = _graph_model(merged, fp16)
    metadata = _metadata(cfg, name, class_names, num_classes, fp16, opset)

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
        ValueError: the file was not written by `export_onnx`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the .onnx file written by export_onnx.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not an ONNX file ({type(err).__name__}).") from None
    out = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    if "vision_lora_version" not in out:
        raise ValueError(f"{path} has no vision_lora metadata; it was not written by vision_lora.export_onnx.")
    return out


# -- loading a trained model ---------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A trained classifier as `vision-lora fit` left it, with what exporting and serving need to know about it.

    Attributes:
        model: the timm model with its LoRA layers (unmerged), in eval mode on the CPU.
        name: the timm model name.
        class_names: the label of each output index.
        data_config: the preprocessing it was trained with (input_size, mean, std, interpolation, crop_pct).
        data_root: the dataset folder of the training run when the checkpoint records it, else None.
    """

    model: nn.Module
    name: str
    class_names: list[str] | None
    data_config: dict
    data_root: str | None = None


def load_model(ckpt_path: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None) -> TrainedModel:
    """Rebuild a trained model from a checkpoint of `vision-lora fit` or from an adapter directory.

    The backbone weights come from the source the run recorded (`weights`: offline, hub or a file), the trained
    tensors (LoRA, head) from the checkpoint or adapter.

    Raises:
        ValueError: not exactly one source, or a file that is not a vision_lora checkpoint / adapter.
        FileNotFoundError: the checkpoint or adapter is missing.
    """
    if (ckpt_path is None) == (adapter is None):
        raise ValueError(
            "exactly one of --ckpt_path or --adapter is needed: a checkpoint of vision-lora fit, or its adapter dir."
        )
    if adapter is not None:
        from timm.data import resolve_model_data_config

        from .adapter import read_adapter_config

        info = read_adapter_config(adapter)
        model = build_from_adapter(adapter).eval()
        data_config = info.get("data_config") or resolve_model_data_config(model)
        return TrainedModel(model, info["model_name"], info.get("class_names"), dict(data_config))
    from .module import LoRAClassifier

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} not found.")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "vision_lora" not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a checkpoint written by vision-lora fit.")
    module = LoRAClassifier(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    root = (checkpoint.get("datamodule_hyper_parameters") or {}).get("root")
    return TrainedModel(module.model.eval(), hparams["backbone"], module.class_names, dict(module.data_config), root)


def build_from_adapter(directory: str | os.PathLike) -> nn.Module:
    """The adapted model of an adapter directory written by `vision-lora fit`: the base model rebuilt from the
    backbone and weight source the adapter records (see `create_backbone`), with the adapter loaded.

    Raises:
        ValueError: the recorded weights cannot be loaded here (e.g. hub weights offline).
    """
    from .adapter import load_adapter, read_adapter_config

    info = read_adapter_config(directory)
    model = create_backbone(info["model_name"], num_classes=info["num_classes"], weights=info.get("weights", "random"))
    return load_adapter(model, directory)


def image_files(directory: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files under `directory` (the DataModule's scan: recursive, hidden ones skipped), sorted; at most
    `limit`, spread evenly over the sorted list so that every class folder is represented.

    Raises:
        FileNotFoundError: no images there.
    """
    paths = [Path(p) for p in data_image_files(directory)]
    if limit is not None and len(paths) > limit:
        paths = [paths[i * len(paths) // limit] for i in range(limit)]
    return paths


def labelled_images(split_dir: str | os.PathLike, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """The images of `split_dir/<class>/` with their class indices in `class_names` order.

    Raises:
        ValueError: a class folder whose name is not among `class_names`.
    """
    split_dir = Path(split_dir)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in index]
    if unknown:
        raise ValueError(f"{split_dir} has class folder {unknown[0]!r}, which is not a class of the model.")
    paths = image_files(split_dir)
    return paths, [index[p.relative_to(split_dir).parts[0]] for p in paths]


def preprocess_files(paths: list[Path], data_config: dict) -> Tensor:
    """The preprocessed batch (N, C, H, W) of image files, with the eval transform of `data_config`."""
    transform = eval_transform(data_config)
    return torch.stack([transform(load_rgb(p)) for p in paths])


# -- int8 -------------------------------------------------------------------------------------------------------------

# Quantizing only the weight-heavy ops keeps Add / Mul / Softmax / LayerNorm in float32, where int8 costs accuracy
# (residual sums and attention probabilities) and saves little time.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")


def _float_nodes(proto: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    """Nodes kept in float32 although their type is quantized:

    - the first one (the stem conv or patch embedding, which reads the image itself) and depthwise / grouped convs:
      they hold a small share of the compute, so int8 saves little there, and they cost the most agreement. On the
      quickstart model, 98.1% top-1 agreement with them in int8, 99.3% without (the digits test split); with only the
      stem in float32 the file is 0.29 of fp32 instead of 0.32, but another quickstart checkpoint fell to 98.9%.
    - MatMuls of two activations (attention's q·kᵀ and p·v): both sides would need a quantize step per call, for a
      small share of the FLOPs; in float32 the int8 ViT-S ran at 0.74 of fp32 latency instead of 0.80 (batch 1).
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

    def __str__(self) -> str:
        acc = ""
        if self.fp32_accuracy is not None:
            acc = f"; accuracy fp32 {100 * self.fp32_accuracy:.2f}%, int8 {100 * self.int8_accuracy:.2f}%"
        verb = "written to" if self.written else "NOT written to"
        return (
            f"int8 ONNX {verb} {self.path}: {self.size_bytes / 1e6:.1f} MB "
            f"({self.size_bytes / self.fp32_size_bytes:.2f} of fp32), calibrated on {self.calibration_images} images "
            f"in {self.seconds:.1f} s\n"
            f"int8 vs fp32 on {self.eval_name} ({self.eval_images} images): top-1 agreement "
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


def _predict(session: ort.InferenceSession, images: Tensor, batch_size: int = 32) -> np.ndarray:
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size].numpy()})[0]
            for i in range(0, len(images), batch_size)
        ]
    ).argmax(1)


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
        labels: the class index of each evaluation image, for accuracies.
        eval_name: how the report names the evaluation images.
        min_agreement: the least share of evaluation images on which both files predict the same class.
        op_types: the ONNX op types to quantize.

    Returns:
        The report; `written` is False when the agreement was under `min_agreement`.

    Raises:
        ValueError: `fp32_path` is not a float32 vision_lora export.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    metadata = read_onnx_metadata(fp32_path)
    if metadata.get("precision") != "float32":
        raise ValueError(f"{fp32_path} is {metadata.get('precision')}; int8 quantization starts from a float32 export.")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vision_lora_int8_") as tmp:
        # quantize_static writes a `-inferred.onnx` beside its input: work on a copy in a private folder.
        source, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        shutil.copyfile(fp32_path, source)
        float_nodes = _float_nodes(onnx.load(str(source)), op_types)
        quantize_static(
            str(source),
            str(quantized),
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=float_nodes,
            per_channel=True,
            # uint8 activations: on AVX2 CPUs without VNNI onnxruntime's int8 x int8 kernels were 1.2-1.4x slower
            # than uint8 x int8 on the quickstart model; accuracy was the same.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
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
        _check_graph(proto)

        fp32_top1 = _predict(ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]), evaluation)
        int8_top1 = _predict(ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"]), evaluation)
        agreement = float((fp32_top1 == int8_top1).mean())
        written = agreement >= min_agreement
        if written:
            atomic_write(output, lambda dst: shutil.copyfile(quantized, dst))
        size = quantized.stat().st_size
    accuracies = (None, None)
    if labels is not None:
        y = labels.numpy()
        accuracies = (float((fp32_top1 == y).mean()), float((int8_top1 == y).mean()))
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
    )


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
    """`quantize_int8` with the images of a run: calibration on `calib_dir` or the `calib_split` of the data root,
    evaluation on its labelled test split (else val; else the calibration images, without accuracies).

    Raises:
        ValueError: no data root to take images from, or the agreement is under `min_agreement` (the int8 file is
            then not written; `fp32_path` stays).
    """
    root = Path(data_root or trained.data_root) if (data_root or trained.data_root) else None
    if calib_dir is None:
        if root is None:
            raise ValueError("int8 calibration needs real images: give --calib_dir DIR or --data.root of the run.")
        calib_dir = root / calib_split
    calibration = preprocess_files(image_files(calib_dir, calib_images), trained.data_config)
    labels, eval_name = None, f"the calibration images of {calib_dir}"
    evaluation = calibration
    split = next((root / s for s in ("test", "val") if root is not None and (root / s).is_dir()), None)
    if split is not None and trained.class_names:
        paths, targets = labelled_images(split, trained.class_names)
        evaluation, labels, eval_name = preprocess_files(paths, trained.data_config), torch.tensor(targets), str(split)
    report = quantize_int8(
        fp32_path, output, calibration, evaluation, labels, eval_name=eval_name, min_agreement=min_agreement
    )
    if not report.written:
        raise ValueError(
            f"{report}\nint8 top-1 agreement {100 * report.agreement:.2f}% is under --min_agreement "
            f"{100 * min_agreement:.2f}%: {output} was not written (the float32 model is {fp32_path})."
        )
    return report
