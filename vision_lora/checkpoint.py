"""Rebuild a trained model from what a run wrote: a checkpoint of `vision-lora fit` or an adapter directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import VisionLoRAError
from .lora.adapter import load_adapter, read_adapter_config
from .preprocess import complete_data_config, resolve_data_config
from .weights import create_backbone

__all__ = ["TrainedModel", "build_from_adapter", "load_model", "read_checkpoint"]


@dataclass
class TrainedModel:
    """A trained classifier as `vision-lora fit` left it, with what exporting and serving need to know about it.

    Attributes:
        model: the timm model with its LoRA layers (unmerged), in eval mode on the CPU.
        name: the timm model name.
        class_names: the label of each output index.
        data_config: the preprocessing it was trained with (see `vision_lora.preprocess`), complete.
        data_root: the dataset folder of the training run when the checkpoint records it, else None.
        task: "multiclass" or "multilabel" (sigmoid outputs, a class is on at or over its threshold).
        thresholds: the per-class probability thresholds of a multi-label model, chosen on val; else None.
        data: the data options of the training run when the checkpoint records them (e.g. its label file), else None.
    """

    model: nn.Module
    name: str
    class_names: list[str] | None
    data_config: dict
    data_root: str | None = None
    task: str = "multiclass"
    thresholds: list[float] | None = None
    data: dict | None = None


def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """The contents of a checkpoint written by `vision-lora fit` (tensors and plain data only; no code is unpickled).

    Raises:
        FileNotFoundError: no file there.
        VisionLoRAError: the file is not a vision_lora checkpoint.
    """
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} not found.")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not checkpoint.get("hyper_parameters") or "vision_lora" not in checkpoint:
        raise VisionLoRAError(f"{ckpt_path} is not a checkpoint written by vision-lora fit.")
    return checkpoint


def load_model(ckpt_path: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None) -> TrainedModel:
    """Rebuild a trained model from a checkpoint of `vision-lora fit` or from an adapter directory.

    The backbone weights come from the source the run recorded (`weights`: offline, hub or a file), the trained
    tensors (LoRA, head) from the checkpoint or adapter.

    Raises:
        VisionLoRAError: not exactly one source, or a file that is not a vision_lora checkpoint / adapter.
        FileNotFoundError: the checkpoint or adapter is missing.
    """
    if (ckpt_path is None) == (adapter is None):
        raise VisionLoRAError(
            "exactly one of --ckpt_path or --adapter is needed: a checkpoint of vision-lora fit, or its adapter dir."
        )
    if adapter is not None:
        info = read_adapter_config(adapter)
        model = build_from_adapter(adapter, info).eval()
        data_config = complete_data_config(info.get("data_config") or resolve_data_config(model))
        task, thresholds = info.get("task", "multiclass"), info.get("thresholds")
        return TrainedModel(model, info["model_name"], info.get("class_names"), data_config, None, task, thresholds)
    from .module import LoRAClassifier  # Lightning: only for checkpoints

    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    module = LoRAClassifier(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    thresholds = module.thresholds.tolist() if module.task == "multilabel" else None
    return TrainedModel(
        module.model.eval(),
        hparams["backbone"],
        module.class_names,
        module.data_config,
        data.get("root"),
        module.task,
        thresholds,
        dict(data),
    )


def build_from_adapter(directory: str | os.PathLike, info: dict | None = None) -> nn.Module:
    """The adapted model of an adapter directory written by `vision-lora fit`: the base model rebuilt from the
    backbone and weight source the adapter records (see `create_backbone`), with the adapter loaded.

    Args:
        directory: the adapter directory.
        info: its config, when the caller has read it already (`read_adapter_config`).

    Raises:
        VisionLoRAError: the recorded weights cannot be loaded here (e.g. hub weights offline).
    """
    info = info if info is not None else read_adapter_config(directory)
    model = create_backbone(info["model_name"], num_classes=info["num_classes"], weights=info.get("weights", "random"))
    return load_adapter(model, directory, info)
