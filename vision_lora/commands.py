"""The commands of `vision-lora` that are not Trainer verbs, as typed functions: each signature is the command's
options and each docstring its `--help` (jsonargparse reads both). `serve` lives in `deploy/serve.py`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from .checkpoint import load_model
from .data.folder import image_files, readable_files
from .errors import VisionLoRAError
from .lora.adapter import save_adapter, save_merged
from .lora.config import LoRAConfig
from .lora.inject import describe_targets
from .runs import resolve_checkpoint

__all__ = ["DataRoot", "OptimizeData", "export", "optimize", "targets"]


@dataclass
class DataRoot:
    """The dataset of a run, for `export --quantize int8`.

    Args:
        root: its image folder or optimized dataset (default: the one the checkpoint records).
    """

    root: str | None = None


def export(
    ckpt_path: str | None = None,
    adapter: str | None = None,
    output: str = "model.onnx",
    format: Literal["onnx", "openvino", "timm", "peft"] = "onnx",  # noqa: A002 - the flag users type
    opset: int = 18,
    fp16: bool = False,
    verify_dir: str | None = None,
    verify_limit: int = 64,
    quantize: Literal["int8"] | None = None,
    calib_dir: str | None = None,
    calib_split: str = "train",
    calib_images: int = 256,
    min_agreement: float = 0.99,
    data: DataRoot | None = None,
    runs_dir: str = "runs/lightning_logs",
) -> None:
    """Merge the trained LoRA into the backbone and export it (ONNX, OpenVINO IR, int8 of either, timm weights or
    PEFT's format).

    ONNX files are verified against PyTorch in onnxruntime, OpenVINO IRs in OpenVINO, before they are written.

    Args:
        ckpt_path: a checkpoint written by `vision-lora fit`, or "best" / "last": that checkpoint of the newest run
            under `runs_dir`.
        adapter: an adapter directory written by `vision-lora fit` (instead of `ckpt_path`).
        output: the file to write (for --format peft a directory; by default `peft_adapter`).
        format: "onnx" (verified against onnxruntime), "openvino" (an OpenVINO IR: `output` is the .xml, the weights
            go to the .bin beside it; converted from the verified ONNX export and verified in OpenVINO; needs the
            [openvino] extra), "timm" (a merged state dict that
            `timm.create_model(name, num_classes=N, checkpoint_path=output)` loads; .safetensors or .pth), or
            "peft" (the unmerged adapter as `adapter_model.safetensors` + `adapter_config.json`, which
            `peft.PeftModel.from_pretrained(timm.create_model(name, num_classes=N), output)` loads).
        opset: ONNX opset version.
        fp16: write fp16 weights (verified with a looser tolerance); ONNX then also computes in fp16, OpenVINO in the
            inference precision it runs with (f32 in `serve` by default).
        verify_dir: a folder of real images to also verify the ONNX file on.
        verify_limit: at most this many images of `verify_dir`.
        quantize: "int8": `output` becomes a static int8 model (ONNX: QDQ by onnxruntime; OpenVINO: NNCF) and the
            verified float32 one is written beside it as `<output stem>.fp32.onnx` (or `.fp32.xml`).
        calib_dir: images to calibrate int8 activations on; by default `calib_split` of the data root.
        calib_split: the split of the data root (the checkpoint's, or --data.root) to calibrate on.
        calib_images: at most this many calibration images.
        min_agreement: the int8 file is not written when its top-1 agreement with float32 on the test split
            (else val) is lower; for a multi-label model, the share of images with the exact same label set.
        data: `--data.root`: the dataset whose images `--quantize int8` uses, when not the checkpoint's.
        runs_dir: where `--ckpt_path best` / `last` look for runs.

    Raises:
        VisionLoRAError: bad options, or an export that does not verify.
    """
    from .deploy.onnx import export_onnx

    if quantize and (fp16 or format not in ("onnx", "openvino")):
        raise VisionLoRAError(
            f"--quantize takes 'int8', for a float32 ONNX or OpenVINO export (no --fp16); got {quantize!r}."
        )
    if ckpt_path in ("best", "last"):
        ckpt_path = str(resolve_checkpoint(ckpt_path, runs_dir))
        rank_zero_info(f"--ckpt_path: {ckpt_path}")
    trained = load_model(ckpt_path=ckpt_path, adapter=adapter)
    if format == "timm":
        path = save_merged(trained.model, output)
        rank_zero_info(f"Merged timm checkpoint written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    if format == "peft":
        path = save_adapter(trained.model, "peft_adapter" if output == "model.onnx" else output, format="peft")
        rank_zero_info(f"PEFT adapter of {trained.name} written to {path}")
        return
    images = readable_files(image_files(verify_dir, verify_limit), trained.data_config)[1] if verify_dir else None
    int8 = dict(calib_dir=calib_dir, calib_split=calib_split, calib_images=calib_images, min_agreement=min_agreement)
    if format == "openvino":
        _export_openvino(trained, output, fp16, images, quantize, data.root if data is not None else None, int8)
        return
    fp32_path = Path(output).with_suffix(".fp32.onnx") if quantize else output
    report = export_onnx(
        trained.model,
        fp32_path,
        class_names=trained.class_names,
        data_config=trained.data_config,
        opset=opset,
        fp16=fp16,
        images=images,
        thresholds=trained.thresholds,
    )
    rank_zero_info(str(report))
    if quantize:
        from .deploy.int8 import quantize_trained

        root = data.root if data is not None else None
        report = quantize_trained(trained, fp32_path, output, data_root=root, **int8)
        rank_zero_info(str(report))


def _export_openvino(
    trained, output: str, fp16: bool, images, quantize: str | None, data_root: str | None, int8: dict
) -> None:
    """`export --format openvino`: the verified IR, and with `quantize` its NNCF int8 behind the agreement gate."""
    from .deploy.int8 import check_agreement, run_images
    from .deploy.openvino import export_openvino, quantize_openvino_int8

    if output == "model.onnx":
        output = "model.xml"
    if Path(output).suffix != ".xml":
        raise VisionLoRAError(f"--format openvino writes an .xml (with a .bin beside it); got --output {output}.")
    fp32_path = Path(output).with_suffix(".fp32.xml") if quantize else Path(output)
    report = export_openvino(
        trained.model,
        fp32_path,
        class_names=trained.class_names,
        data_config=trained.data_config,
        fp16=fp16,
        images=images,
        thresholds=trained.thresholds,
    )
    rank_zero_info(str(report))
    if quantize:
        min_agreement = int8.pop("min_agreement")
        calibration, evaluation, labels, eval_name = run_images(trained, data_root=data_root, **int8)
        settings = dict(eval_name=eval_name, min_agreement=min_agreement)
        result = quantize_openvino_int8(fp32_path, output, calibration, evaluation, labels, **settings)
        rank_zero_info(str(check_agreement(result, fp32_path)))


@dataclass
class OptimizeData:
    """The data to write: an image folder, a label file or a Hugging Face dataset (the options of `fit`'s --data).

    Args:
        root: image folder holding train/<class>/<image> (and val/, test/ when it has them); with `labels`, the
            folder its paths are relative to.
        val_fraction: share of each class of train/ held out for val when there is no val/.
        seed: seed of that split.
        labels: a CSV or JSONL label file (docs/label-files.md).
        task: "auto", "multiclass" or "multilabel" (multi-label targets are stored as lists of classes).
        classes: the class list and order of a label file.
        label_sep: separator of several classes in a CSV label cell.
        allow_outside_root: accept label-file paths that leave `root`.
        hf: a Hugging Face dataset (save_to_disk folder or local spec; docs/huggingface.md).
        hf_image_column: its image column.
        hf_label_column: its label column.
    """

    root: str | None = None
    val_fraction: float = 0.15
    seed: int = 0
    labels: str | None = None
    task: Literal["auto", "multiclass", "multilabel"] = "auto"
    classes: list[str] | None = None
    label_sep: str = " "
    allow_outside_root: bool = False
    hf: str | None = None
    hf_image_column: str = "image"
    hf_label_column: str = "label"


def optimize(
    data: OptimizeData,
    output: str | None = None,
    max_side: int = 512,
    quality: int = 90,
    num_workers: int | None = None,
) -> None:
    """Write each split of an image folder, label file or Hugging Face dataset as LitData chunks of pre-resized
    image bytes + labels (multi-label: the list of classes).

    For fast local or streamed (s3://...) training with --data.root <output>. Needs the [stream] extra.

    Args:
        data: the source (`--data.root`, `--data.labels`, `--data.hf`, ...; as `fit` takes them).
        output: folder to write (created; must be new, empty or ours); required.
        max_side: longer side of stored images.
        quality: JPEG quality of re-encoded images.
        num_workers: writer processes (default: all CPUs).
    """
    from dataclasses import asdict

    from .data.sources import open_source
    from .data.streaming import optimize_folder

    if output is None:
        raise VisionLoRAError("vision-lora optimize needs --output, the folder to write.")
    source = open_source(asdict(data))[0]
    if source is None:
        raise VisionLoRAError("vision-lora optimize needs --data.root (an image folder), --data.labels or --data.hf.")
    report = optimize_folder(source, output, max_side, quality, num_workers)
    print(report, file=sys.stderr)


def targets(
    model: str,
    r: int = 8,
    qkv_slices: str = "qv",
    target_modules: list[str] | None = None,
    exclude_modules: list[str] | None = None,
) -> None:
    """Print what LoRA would adapt in a timm model, and what its preset skips.

    Nothing is trained or downloaded: the model is built with random weights.

    Args:
        model: timm model name, e.g. tiny_vit_5m_224.
        r: LoRA rank.
        qkv_slices: which slices of a fused qkv projection are adapted, a subset of "qkv", or "fused".
        target_modules: module-name patterns (default: the preset of the model's family), as in LoRAConfig.
        exclude_modules: patterns removed from what target_modules selects.
    """
    config = LoRAConfig(r=r, qkv_slices=qkv_slices, target_modules=target_modules, exclude_modules=exclude_modules)
    print(describe_targets(model, config))
