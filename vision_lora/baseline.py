"""`vision-lora fit --baseline head`: the head-only probe, trained with the plain loop's recipe before the LoRA run, so
that the end of the run says whether LoRA earned its cost on this data against a strong probe."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .callbacks import BadFileReport
from .data import ImageFolderDataModule
from .errors import VisionLoRAError
from .module import LoRAClassifier

__all__ = ["PLAIN_LOOP", "PLAIN_LOOP_EPOCHS", "BaselineResult", "evaluate_best", "fit_head_probe", "write_comparison"]

# The plain loop, the reference of the recipe study: the eval transform plus a flip where flips are allowed ("light"),
# AdamW at 1e-3 with weight decay 0.01 at a constant rate, cross-entropy without smoothing, 10 epochs, the best val
# epoch's checkpoint. The probe trains the head alone this way.
PLAIN_LOOP = {
    "lr": 1e-3,
    "head_lr": None,
    "weight_decay": 0.01,
    "schedule": "constant",
    "label_smoothing": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
}
PLAIN_LOOP_EPOCHS = 10

# Trainer options of the run that the probe shares (it always runs on one device).
SHARED_TRAINER_OPTIONS = (
    "accelerator",
    "precision",
    "limit_train_batches",
    "limit_val_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "log_every_n_steps",
)


@dataclass(frozen=True)
class BaselineResult:
    """The accuracy of a run's best checkpoint (by val accuracy) on `split`."""

    name: str
    split: str
    accuracy: float
    val_acc: float | None
    checkpoint: str


def evaluate_best(
    trainer: L.Trainer, model: L.LightningModule, data: ImageFolderDataModule, name: str
) -> BaselineResult:
    """Accuracy of `trainer`'s best checkpoint on the test split, else on val (its best val accuracy)."""
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") or None
    score = getattr(callback, "best_model_score", None)
    val_acc = float(score) if score is not None else None
    if data.has_split("test"):
        loggers, trainer.loggers = trainer.loggers, []  # nothing of this pass is logged
        try:
            metrics = L.Trainer.test(trainer, model, datamodule=data, ckpt_path=best, verbose=False)
        finally:
            trainer.loggers = loggers
        return BaselineResult(name, "test", float(metrics[0]["test_acc"]), val_acc, str(best))
    if val_acc is None:
        raise VisionLoRAError(f"--baseline head: the {name} run has no val accuracy to compare; keep validation on.")
    return BaselineResult(name, "val", val_acc, val_acc, str(best))


def fit_head_probe(
    model: LoRAClassifier, data: ImageFolderDataModule, trainer_options: dict[str, Any], out_dir: Path
) -> BaselineResult:
    """Train the head alone (`head_warmup=1`) with the plain loop's recipe (`PLAIN_LOOP`, "light" augmentation,
    `PLAIN_LOOP_EPOCHS` epochs), the other options of `model` (backbone, preprocessing) and the run's data, into
    `out_dir`; return the accuracy of its best checkpoint.

    Raises:
        VisionLoRAError: `model` already trains the head alone.
    """
    if model.hparams.head_warmup >= 1.0:
        raise VisionLoRAError(
            "--baseline head compares LoRA with the head alone, but model.head_warmup=1 already trains "
            "the head alone; lower model.head_warmup or drop --baseline."
        )
    options = {k: v for k, v in model.hparams.items() if k in inspect.signature(LoRAClassifier).parameters}
    probe = LoRAClassifier(**{**options, **PLAIN_LOOP, "head_warmup": 1.0})
    probe.load_state_dict(model.state_dict())  # the same backbone and starting head as the LoRA run
    options = {k: v for k, v in trainer_options.items() if k in SHARED_TRAINER_OPTIONS and v is not None}
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", monitor="val_acc", mode="max", filename="best-{epoch:02d}-{val_acc:.4f}"
    )
    trainer = L.Trainer(
        **options,
        max_epochs=PLAIN_LOOP_EPOCHS,
        devices=1,
        logger=CSVLogger(save_dir=str(out_dir.parent), name="", version=out_dir.name),
        callbacks=[checkpoint, BadFileReport()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    augment = data.hparams.augment
    data.use_augment("light")
    try:
        trainer.fit(probe, datamodule=data)
        return evaluate_best(trainer, probe, data, "head-only")
    finally:
        data.use_augment(augment)


def write_comparison(path: Path, probe: BaselineResult, lora: BaselineResult) -> list[str]:
    """Write both results to `path` (JSON) and return the lines to print."""
    gain = 100 * (lora.accuracy - probe.accuracy)
    path.write_text(json.dumps({"head_only": asdict(probe), "lora": asdict(lora), "lora_gain_pt": gain}, indent=1))
    verdict = "LoRA pays" if gain > 0.5 else "LoRA does not pay here: the head alone does as well" if gain > -0.5 \
        else "the head alone is better here"  # fmt: skip
    return [
        f"baseline: head-only {probe.split}_acc={probe.accuracy:.4f} ({Path(probe.checkpoint).name})",
        f"baseline: LoRA      {lora.split}_acc={lora.accuracy:.4f} ({Path(lora.checkpoint).name})",
        f"baseline: LoRA - head-only = {gain:+.1f} pt on {lora.split}: {verdict}",
    ]
