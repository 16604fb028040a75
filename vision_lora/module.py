"""LoRAClassifier: the LightningModule that builds a timm backbone, adapts it with LoRA and trains adapters + head."""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .errors import VisionLoRAError
from .lora.adapter import adapter_state_dict, load_adapter
from .lora.config import LoRAConfig
from .lora.inject import apply_lora, lora_report
from .lora.targets import classifier_names
from .multilabel import CLASS_WEIGHTS, DEFAULT_THRESHOLD
from .preprocess import complete_data_config, data_config_record, resolve_data_config
from .tasks import LabelTasks
from .weights import create_backbone

__all__ = ["LoRAClassifier", "lr_factor"]

# Frozen BatchNorm layers stay in eval mode during training on purpose (their statistics are part of the backbone).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class _AtMostOne:
    """A rate metric whose float accumulation never reports more than 1 (a macro average of ones can add up to
    1.0000001)."""

    def compute(self) -> Tensor:
        return super().compute().clamp(max=1.0)


class Accuracy(_AtMostOne, MulticlassAccuracy):
    pass


class MacroF1(_AtMostOne, MulticlassF1Score):
    pass


def _check_lora_options(lora: dict) -> None:
    """Raises ValueError for an option that is neither LoRAClassifier's nor LoRAConfig's, naming the closest."""
    unknown = sorted(set(lora) - set(LoRAConfig.__dataclass_fields__))
    if unknown:
        known = [*inspect.signature(LoRAClassifier.__init__).parameters, *LoRAConfig.__dataclass_fields__]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise VisionLoRAError(
            f"LoRAClassifier has no option {unknown[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
        )


def is_convnet(model: torch.nn.Module) -> bool:
    """Whether `model` is convolutional beyond its stem (a ViT has one conv, its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def lr_factor(step: int, start: int, total: int, warmup_fraction: float) -> float:
    """The learning-rate multiplier at optimizer step `step`: zero before `start`, then over the steps from `start`
    to `total` a linear warmup from 0.01 to 1 across `warmup_fraction` of them and a cosine decay to zero."""
    if step < start:
        return 0.0
    span = max(total - start, 1)
    warmup = min(int(warmup_fraction * span), span - 1)
    t = step - start
    if t < warmup:
        return 0.01 + 0.99 * t / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(t - warmup, span - warmup) / max(span - warmup, 1)))


def _constant_factor(step: int, start: int) -> float:
    """The constant schedule's multiplier: zero before `start` (the head-only steps, for LoRA groups), then one."""
    return 0.0 if step < start else 1.0


class LoRAClassifier(LabelTasks, L.LightningModule):
    """A timm classifier fine-tuned with LoRA: adapters and the classifier head train, the backbone stays frozen.

    Checkpoints hold only what trains (plus optimizer state and these hyperparameters), so a ViT-B run writes about
    a megabyte; loading one accepts exactly the frozen backbone keys as missing. (With `weights="random"` the
    backbone cannot be rebuilt from its name, so checkpoints then keep it in full.)

    Args:
        backbone: timm model name, e.g. "vit_base_patch16_224.augreg_in21k" or "tf_efficientnet_lite0".
        weights: backbone weights: "random", "pretrained" (the packaged offline weights where they exist, else
            timm's hub; the default of `vision-lora fit`), "hub" (timm's pretrained download), "offline" (packaged
            weights, e.g. for tf_efficientnet_lite0), or the path of a .pth / .safetensors file.
        num_classes: classes of the new head; linked from the data. None: taken from `class_names`, or from the
            checkpoint being loaded.
        class_names: label of each class index; linked from the data.
        init_adapter: an adapter directory to start from, vision_lora's or PEFT's (a LoRA / DoRA trained with
            Hugging Face PEFT on this backbone): its LoRA layers, weights and head are loaded and train on; the LoRA
            options are then the adapter's.
        **lora: the options of `LoRAConfig` (r, lora_alpha, target_modules, qkv_slices, use_dora, rank_pattern, ...),
            flat: `--model.r 16`, `--model.use_dora true`, YAML `model: {r: 16}`; LoRAConfig is their one definition.
        lr: learning rate of the LoRA parameters.
        head_lr: learning rate of the classifier head (and other trained non-LoRA parameters); None: `lr`.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_fraction: fraction of all training steps spent in linear warmup before the cosine decay (cosine
            schedule only).
        head_warmup: fraction of the training steps in which only the head trains (a linear probe), before LoRA
            joins with a warmup and cosine decay of its own over the remaining steps (linear-probe-then-fine-tune:
            a trained head keeps the pretrained features from being distorted by a random one). 1.0 trains the head
            alone: LoRA stays at zero, the head-only baseline.
        schedule: the learning-rate schedule: "cosine" (a warmup over `warmup_fraction` of the steps, then a cosine
            decay to zero: for a length known in advance), "constant" (the rate throughout, after `head_warmup`: for a
            length the val curve decides), or "auto": `vision-lora fit` picks constant when it decides the length or
            screens recipes during the run, else cosine.
        label_smoothing: label smoothing of the cross-entropy loss.
        mixup_alpha: timm mixup alpha; 0 disables mixup.
        cutmix_alpha: timm cutmix alpha; 0 disables cutmix.
        drop_path_rate: stochastic depth of the backbone; None keeps timm's default.
        grad_checkpointing: timm activation checkpointing of the backbone blocks (less memory, more compute).
        channels_last: run the model in channels-last memory format; None: on for ConvNets (faster LoRA training
            steps on the CPU; docs/benchmarks.md), off for ViTs.
        compile: run the backbone's forward through `torch.compile` (the first steps pay for compilation; the
            state dict, checkpoints and the `model` attribute stay those of the eager model).
        input_size: side (or [H, W]) of the network input; None: the backbone's timm data config.
        mean: per-channel normalisation mean; None: the backbone's timm data config.
        std: per-channel normalisation std; None: the backbone's timm data config.
        interpolation: resize interpolation, e.g. "bilinear" or "bicubic"; None: the backbone's timm data config.
        crop_pct: eval center-crop fraction; None: the backbone's timm data config.
        data_config: a complete preprocessing config, as checkpoints of vision-lora 0.1 record it; it wins over
            the five options above.
        task: "multiclass" (softmax, cross-entropy) or "multilabel" (sigmoid, BCE with logits; metrics val_map,
            val_f1_micro, val_f1_macro, val_exact_match at per-class thresholds chosen on val); linked from the
            data. None: multiclass, or the task of the checkpoint being loaded.
        class_weights: weighting of the loss against class imbalance, from the training counts: "none", "inverse"
            (frequency), "effective" (number of samples), "auto" (the effective number); multi-label: BCE's
            `pos_weight` (negatives / positives per class) for any of them but "none". None: left to `--recipe auto`,
            which screens it on imbalanced data; else "none".

    The model owns its preprocessing: `data_config` (the backbone's timm config with the options above) is what the
    DataModule, test, predict and export of a checkpoint all use.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "random",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        init_adapter: str | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.05,
        head_warmup: float = 0.0,
        schedule: Literal["auto", "cosine", "constant"] = "auto",
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        drop_path_rate: float | None = None,
        grad_checkpointing: bool = False,
        channels_last: bool | None = None,
        compile: bool = False,
        input_size: int | list[int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        data_config: dict | None = None,
        task: Literal["multiclass", "multilabel"] | None = None,
        class_weights: Literal["none", "auto", "inverse", "effective"] | None = None,
        **lora: Any,
    ) -> None:
        super().__init__()
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise VisionLoRAError(f"{len(class_names)} class names given for num_classes={num_classes}.")
        if not 0.0 <= head_warmup <= 1.0:
            raise VisionLoRAError(f"head_warmup is a fraction of the training steps in [0, 1], got {head_warmup}.")
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
        if task not in (None, "multiclass", "multilabel"):
            raise VisionLoRAError(f"task must be 'multiclass' or 'multilabel', not {task!r}.")
        if class_weights is not None and class_weights not in CLASS_WEIGHTS:
            raise VisionLoRAError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, not {class_weights!r}.")
        if task == "multilabel" and (mixup_alpha > 0 or cutmix_alpha > 0):
            raise VisionLoRAError("mixup / cutmix mix single labels; set model.mixup_alpha and cutmix_alpha to 0.")
        self.task = task or "multiclass"
        _check_lora_options(lora)
        # jsonargparse follows `**lora` into this call: the CLI shows LoRAConfig's fields, typed and documented.
        self.lora_config = LoRAConfig(**lora)
        # Every option recorded, the LoRA ones flat and complete (as checkpoints of 0.1 spell them).
        self.save_hyperparameters()
        self.hparams.update(self.lora_config.to_dict())
        kwargs = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        self.model = create_backbone(backbone, num_classes=num_classes, weights=weights, **kwargs)
        overrides = {"input_size": input_size, "mean": mean, "std": std, "interpolation": interpolation}
        overrides["crop_pct"] = crop_pct
        self.data_config = (
            complete_data_config(data_config) if data_config else resolve_data_config(self.model, overrides)
        )
        # Recorded resolved, so that a checkpoint does not depend on the timm version that reads it.
        self.hparams["data_config"] = data_config_record(self.data_config)
        if init_adapter is None:
            self.report = apply_lora(self.model, self.lora_config)
        else:
            load_adapter(self.model, init_adapter)
            self.lora_config = self.model.lora_config
            self.hparams.update(self.lora_config.to_dict())
            self.report = lora_report(self.model)
            # The checkpoint stands alone: its weights are the adapter's from here on and its LoRA options rebuild
            # the same layers, so what it records is that config, not the folder (which may be deleted).
            self.hparams["init_adapter"] = None
        self._init_adapter = init_adapter
        if head_warmup >= 1.0:  # the head-only probe: nothing of LoRA trains (and no backward through it)
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(False)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.channels_last = is_convnet(self.model) if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # A compiled function, not a submodule: no `_orig_mod.` state-dict keys, and `self.model` stays eager (export).
        self._compiled_forward = torch.compile(self.model.forward) if compile else None
        self._loss_weight: Tensor | None = None  # class weights, set in `setup` from the training counts
        self._build_metrics()
        self._mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self._mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )
        self._checked_grads = False

    # -- model ---------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    def _build_metrics(self) -> None:
        """`acc`: top-1 accuracy, the share of images classified right (what checkpoints monitor as `val_acc`);
        `balanced_acc`: the mean of the per-class recalls; `f1`: macro F1; `acc5`: top-5 accuracy from 5 classes.
        Multi-label: the scores and targets of a pass are kept and scored at its end (`_multilabel_epoch_end`)."""
        n = self.num_classes
        if self.task == "multilabel":
            self.register_buffer("thresholds", torch.full((n,), DEFAULT_THRESHOLD))
            self._kept: dict[str, list[tuple[Tensor, Tensor]]] = {"val": [], "test": []}
            self._named_absent: set[str] = set()
            return
        metrics = {
            "acc": Accuracy(n, average="micro"),
            "balanced_acc": Accuracy(n, average="macro"),
            "f1": MacroF1(n, average="macro"),
        }
        if n >= 5:
            metrics["acc5"] = Accuracy(n, top_k=5, average="micro")
        # No compute groups: top-1 and top-5 accuracy have the same state layout but must not share it.
        self.val_metrics = MetricCollection(metrics, prefix="val_", compute_groups=False)
        self.test_metrics = self.val_metrics.clone(prefix="test_")

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x) if self._compiled_forward is None else self._compiled_forward(x)

    def trainable_state_keys(self) -> set[str]:
        """State-dict keys (with the `model.` prefix) of what trains: LoRA, head, and what the LoRA config adds."""
        return {f"model.{k}" for k in adapter_state_dict(self.model)}

    def checkpoint_state_keys(self) -> set[str]:
        """What a checkpoint keeps: what trains (and the multi-label thresholds), or everything when the backbone is
        randomly initialised and so cannot be rebuilt from its name."""
        if self.hparams.weights == "random":
            return set(self.state_dict())
        return self.trainable_state_keys() | ({"thresholds"} if self.task == "multilabel" else set())

    def setup(self, stage: str) -> None:
        """For fit with `class_weights`: the loss weights from the data's training counts."""
        if stage == "fit":
            self.use_class_weights(self.hparams.get("class_weights") or "none")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if x.shape[0] == 0:  # every image of the batch was unreadable and skipped
            return None
        if self.task == "multilabel":
            loss = self._multilabel_loss(self(x), y)
        elif self._mixup is not None and x.shape[0] % 2 == 0:
            x, soft = self._mixup(x, y)
            loss = SoftTargetCrossEntropy()(self(x), soft)
        elif self._loss_weight is not None:
            weight = self._loss_weight.to(x.device)
            loss = F.cross_entropy(self(x), y, weight=weight, label_smoothing=self.hparams.label_smoothing)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self._check_finite(loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _check_finite(self, loss: Tensor) -> None:
        """Stop the run at the first non-finite loss, before its gradients touch the weights.

        Raises:
            VisionLoRAError: the loss is NaN or infinite (the message gives the step, the learning rates and the last
                finite loss; the checkpoints on disk still hold the last good weights).
        """
        value = float(loss.detach())
        if math.isfinite(value):
            self._last_finite_loss = (int(self.global_step), value)
            return
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        lrs = ", ".join(f"{g['lr']:.3g}" for g in optimizer.param_groups) if optimizer is not None else "?"
        step, last = getattr(self, "_last_finite_loss", (None, None))
        before = "no step had a finite loss" if last is None else f"the last finite loss was {last:.4g} at step {step}"
        raise VisionLoRAError(
            f"Training diverged at step {int(self.global_step)} (epoch {self.current_epoch}): the loss is {value}; "
            f"learning rates {lrs}; {before}. The run stopped before this step changed the weights, and no "
            "checkpoint or adapter with non-finite values was written. Lower --model.lr / --model.head_lr."
        )

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection | None, stage: str) -> Tensor | None:
        x, y = batch
        if x.shape[0] == 0:
            return None
        logits = self(x)
        if self.task == "multilabel":
            loss = self._multilabel_loss(logits, y)
            self._kept[stage].append((logits.detach().float().sigmoid().cpu(), y.detach().float().cpu()))
            self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
            return logits
        loss = F.cross_entropy(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        """Returns the logits (for callbacks such as `reports.EvalPredictions`)."""
        return self._eval_step(batch, getattr(self, "val_metrics", None), "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        return self._eval_step(batch, getattr(self, "test_metrics", None), "test")

    def predict_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> dict:
        x, paths = batch
        if x.shape[0] == 0:
            return {"paths": [], "probs": x.new_zeros(0, self.num_classes)}
        if self.task == "multilabel":
            return {"paths": list(paths), "probs": self(x).float().sigmoid(), "thresholds": self.thresholds}
        return {"paths": list(paths), "probs": self(x).softmax(-1)}

    # -- optimization --------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: LoRA at `lr`, everything else that trains at `head_lr`; no weight decay on
        biases and norm weights. Each group says whether it holds LoRA (`"lora"`), for the schedule."""
        hp = self.hparams
        groups: dict[tuple[bool, float, float], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lora = "lora_" in name
            lr = hp.lr if lora else (hp.head_lr or hp.lr)
            decay = 0.0 if p.ndim <= 1 else hp.weight_decay
            groups.setdefault((lora, lr, decay), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd, "lora": lora} for (lora, lr, wd), ps in groups.items()]

    def configure_optimizers(self):
        """AdamW with the `schedule`, per step. Cosine: a linear warmup from 1% over `warmup_fraction` of the steps,
        then a cosine decay to zero. Constant: the set rates. LoRA groups start after the `head_warmup` share of the
        steps (of the cap, for a constant schedule), with a cosine warmup and decay of their own."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        head_steps = min(int(hp.head_warmup * total), total - 1)
        if hp.get("schedule", "auto") == "constant":
            factors = [partial(_constant_factor, start=head_steps if g["lora"] else 0) for g in optimizer.param_groups]
        else:
            cosine = partial(lr_factor, total=total, warmup_fraction=hp.warmup_fraction)
            factors = [partial(cosine, start=head_steps if g["lora"] else 0) for g in optimizer.param_groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._checked_grads:
            return
        self._checked_grads = True
        starved = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if starved:
            raise VisionLoRAError(
                f"{len(starved)} trainable parameters received no gradient in the first step, e.g. "
                f"{', '.join(starved[:5])}. Something cuts them off from the loss (for example reentrant activation "
                f"checkpointing over a frozen input); the run would train nothing there."
            )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.checkpoint_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["vision_lora"] = {
            "init_adapter": self._init_adapter,
            "backbone": self.hparams.backbone,
            "architecture": self.model.pretrained_cfg.get("architecture"),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
        }
        if self.task == "multilabel":
            checkpoint["vision_lora"].update(task="multilabel", thresholds=self.thresholds.tolist())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("vision_lora")
        if info is None:
            raise VisionLoRAError("This checkpoint was not written by vision_lora's LoRAClassifier.")
        stored = info.get("task", "multiclass")
        if stored != self.task:
            if self.hparams.get("task") is not None:
                raise VisionLoRAError(
                    f"The checkpoint is {stored} but the data is {self.task}; point the data at the dataset the "
                    "checkpoint was trained on, or leave data.task auto."
                )
            self.task = stored  # hparams keep None: the data of this run records None too
            self._build_metrics()
        arch = self.model.pretrained_cfg.get("architecture")
        if info["architecture"] != arch:
            raise VisionLoRAError(f"The checkpoint was trained on {info['backbone']!r}; this model is {arch!r}.")
        if info["num_classes"] != self.num_classes:
            if self.hparams.num_classes is not None:
                raise VisionLoRAError(
                    f"The checkpoint has {info['num_classes']} classes but the model was built with "
                    f"{self.num_classes} (from the data); point the data at the dataset the checkpoint was trained on."
                )
            self._resize_head(info["num_classes"], info["class_names"])
        elif self.hparams.num_classes is None:
            self.hparams.class_names = info["class_names"]

    def _resize_head(self, num_classes: int, class_names: list[str]) -> None:
        """Give a model built without a class count the head of the checkpoint it loads."""
        self.model.reset_classifier(num_classes)
        for name in classifier_names(self.model):
            for p in self.model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self.hparams.num_classes = num_classes
        self.hparams.class_names = class_names
        self._build_metrics()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a (trainable-only) state dict: the frozen backbone keys may be missing, nothing else may be.

        Raises:
            VisionLoRAError: a trained key is missing, a key is unknown, or a shape differs.
        """
        own = self.state_dict()
        missing = set(own) - set(state_dict)
        unexpected = set(state_dict) - set(own)
        lacking = missing & self.trainable_state_keys()
        if unexpected or (strict and lacking):
            raise VisionLoRAError(
                f"Checkpoint does not fit this model: missing trained keys {sorted(lacking)[:5]}, unexpected keys "
                f"{sorted(unexpected)[:5]}. Was it written for another backbone or LoRA configuration?"
            )
        wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise VisionLoRAError(
                f"Checkpoint tensor {k} has shape {tuple(state_dict[k].shape)}, the model {tuple(own[k].shape)}; "
                f"check num_classes, rank and targets."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # -- info ----------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        rank_zero_info(str(self.report))
