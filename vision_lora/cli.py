"""The `vision-lora` command: LightningCLI with fit / validate / test / predict and an `export` subcommand."""

from __future__ import annotations

import inspect
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .adapter import build_from_adapter, read_adapter_config, save_merged
from .callbacks import AtomicCheckpointIO, PredictionWriter, SaveBestAdapter
from .data import IMAGE_EXTENSIONS, BadFileReport, FolderSource, ImageFolderDataModule, load_rgb, optimize_folder
from .module import LoRAClassifier

__all__ = ["VisionLoRACLI", "VisionLoRATrainer", "main"]


def _verify_images(directory: str, data_config: dict, limit: int) -> torch.Tensor:
    from timm.data import create_transform

    transform = create_transform(**data_config)
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not paths:
        raise ValueError(f"No images found in --verify_dir {directory}.")
    return torch.stack([transform(load_rgb(p)) for p in paths])


class VisionLoRATrainer(L.Trainer):
    """Lightning's Trainer plus `export`: merge the adapter and write ONNX (verified in onnxruntime) or timm weights."""

    def export(
        self,
        model: LoRAClassifier,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        adapter: str | None = None,
        output: str = "model.onnx",
        format: str = "onnx",  # noqa: A002 - the CLI flag users type
        opset: int = 18,
        fp16: bool = False,
        verify_dir: str | None = None,
        verify_limit: int = 64,
    ) -> None:
        """Merge LoRA into the backbone and export it.

        Args:
            model: the LoRAClassifier (rebuilt from the checkpoint's hyperparameters when `ckpt_path` is given).
            datamodule: unused.
            ckpt_path: a checkpoint written by `vision-lora fit`.
            adapter: an adapter directory written by `vision-lora fit` (instead of `ckpt_path`).
            output: the file to write.
            format: "onnx" (verified against onnxruntime) or "timm" (a merged state dict that
                `timm.create_model(name, num_classes=N, checkpoint_path=output)` loads; .safetensors or .pth).
            opset: ONNX opset version.
            fp16: write fp16 ONNX weights (verified with a looser tolerance).
            verify_dir: a folder of real images to also verify the ONNX file on.
            verify_limit: at most this many images of `verify_dir`.
        """
        from timm.data import resolve_model_data_config

        from .export import export_onnx

        if (ckpt_path is None) == (adapter is None):
            raise ValueError("export needs exactly one of --ckpt_path or --adapter.")
        if format not in ("onnx", "timm"):
            raise ValueError(f"--format must be 'onnx' or 'timm', got {format!r}.")
        if adapter is not None:
            info = read_adapter_config(adapter)
            net, class_names = build_from_adapter(adapter), info.get("class_names")
            data_config = info.get("data_config") or resolve_model_data_config(net)
        else:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"])
            net, class_names, data_config = model.model, model.class_names, model.data_config
        if format == "timm":
            path = save_merged(net, output)
            rank_zero_info(f"Merged timm checkpoint written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return
        images = _verify_images(verify_dir, data_config, verify_limit) if verify_dir else None
        report = export_onnx(
            net, output, class_names=class_names, data_config=data_config, opset=opset, fp16=fp16, images=images
        )
        rank_zero_info(str(report))


def _resolve_last_checkpoint(config) -> None:
    """Turn `fit --ckpt_path last` into the newest `last.ckpt` of this run's logger (or checkpoint dirpath) and keep
    logging into that run's version directory.

    Lightning alone would look for "last" only in the new run's (empty) directory and silently start from scratch.
    """
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None)
    if config.checkpoint.get("dirpath"):
        candidates = [Path(config.checkpoint.dirpath) / "last.ckpt"]
    elif init_args is not None and init_args.get("save_dir") is not None:
        root = Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
        candidates = list(root.glob("version_*/checkpoints/last.ckpt"))
    else:
        candidates = [Path(config.trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:  # as in Lightning, "last" may be set before the first run: start one, and say so
        rank_zero_warn("--ckpt_path last: no last.ckpt of this run exists yet; starting a new run.")
        config.ckpt_path = None
        return
    last = max(candidates, key=lambda c: c.stat().st_mtime)
    config.ckpt_path = str(last)
    version_dir = last.parent.parent
    if init_args is not None and version_dir.name.startswith("version_") and not config.checkpoint.get("dirpath"):
        init_args.version = int(version_dir.name.removeprefix("version_"))
    rank_zero_info(f"Resuming from {last}")


_LINKED = ("num_classes", "class_names")  # model options that the CLI fills in from the data
_DEFAULT_BACKBONE = inspect.signature(LoRAClassifier).parameters["backbone"].default


class VisionLoRACLI(LightningCLI):
    """LightningCLI for LoRAClassifier + ImageFolderDataModule: the data decides the head size and class names."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in _LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--last_every_n_steps",
            type=int | None,
            default=None,
            help="Also refresh last.ckpt every N training steps (default: only at the end of each epoch).",
        )
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # see instantiate_trainer
                "checkpoint.filename": "best-{epoch:02d}-{val_acc:.4f}",
            }
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        callbacks = [
            BadFileReport(),
            SaveBestAdapter(),
            PredictionWriter(),
            LearningRateMonitor(logging_interval="epoch"),
        ]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:0] = callbacks
        # `last.ckpt` after every epoch. ModelCheckpoint(save_last=True) refreshes it only when the monitored metric
        # improves, so a resumed run could silently lose epochs. Appended: `trainer.checkpoint_callback` (the first
        # one) stays the monitored "best" callback.
        if trainer.checkpoint_callback is not None:
            trainer.callbacks.append(ModelCheckpoint(filename="last", enable_version_counter=False))
            every = self._subcommand_config().get("last_every_n_steps")
            if every:  # also mid-epoch, for long epochs; a streaming dataset resumes at that very sample
                last = ModelCheckpoint(filename="last", enable_version_counter=False, every_n_train_steps=every)
                trainer.callbacks.append(last)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Next, Lightning replaces the model options with the hyperparameters stored in --ckpt_path, and the links
        # replace num_classes / class_names with the data's: keep what the user asked for, to check it against both.
        model = self._subcommand_config().get("model") or {}
        self._requested = {key: model.get(key) for key in ("backbone", *_LINKED)}

    def _subcommand_config(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        requested, stored = self._requested.get("backbone"), config.model.get("backbone")
        if requested not in (None, _DEFAULT_BACKBONE, stored):
            raise ValueError(
                f"{config.ckpt_path} was trained on {stored!r} but model.backbone is {requested!r}; leave "
                f"model.backbone out (the checkpoint sets it) or pass a checkpoint of {requested!r}."
            )
        if self.config.get("subcommand") == "fit" and config.get("ckpt_path") == "last":
            _resolve_last_checkpoint(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        data = self.datamodule
        if not isinstance(data, ImageFolderDataModule) or data.num_classes is None:
            return
        found = {"num_classes": data.num_classes, "class_names": data.class_names}
        for key in _LINKED:
            requested = self._requested.get(key)
            if requested is not None and requested != found[key]:
                raise ValueError(
                    f"model.{key}={requested} disagrees with the data: {data.root} has {data.num_classes} "
                    f"classes ({', '.join(data.class_names)}). "
                    f"Remove model.{key} from the config; vision-lora takes it from the data."
                )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}


TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


def optimize(args: list[str]) -> None:
    """`vision-lora optimize`: write an image folder as a LitData optimized dataset (see `optimize_folder`)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vision-lora optimize",
        description="Write each split of an image folder as LitData chunks of pre-resized image bytes + labels, "
        "for fast local or streamed (s3://...) training with --data.root <output>.",
    )
    parser.add_argument("--data.root", dest="root", required=True, help="image folder holding train/<class>/<image>")
    parser.add_argument(
        "--data.val_fraction",
        dest="val_fraction",
        type=float,
        default=0.15,
        help="share of each class of train/ held out for val when there is no val/ (default 0.15)",
    )
    parser.add_argument("--data.seed", dest="seed", type=int, default=0, help="seed of that split (default 0)")
    parser.add_argument("--output", required=True, help="folder to write (created; must be new, empty or ours)")
    parser.add_argument("--max_side", type=int, default=512, help="longer side of stored images (default 512)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--num_workers", type=int, default=None, help="writer processes (default: all CPUs)")
    ns = parser.parse_args(args)
    source = FolderSource(ns.root, ns.val_fraction, ns.seed)
    report = optimize_folder(source, ns.output, ns.max_side, ns.quality, ns.num_workers)
    print(report, file=sys.stderr)


def main(args: list[str] | None = None) -> None:
    """Entry point of `vision-lora`; `args` replaces `sys.argv[1:]` (for tests and notebooks).

    Errors a user can fix (bad paths, options, data) end with one line on stderr and exit status 1; set
    VISION_LORA_TRACEBACK=1 to see the traceback.
    """
    try:
        argv = sys.argv[1:] if args is None else args
        if argv[:1] == ["optimize"]:
            return optimize(argv[1:])
        given = [key for key in _LINKED for arg in argv if arg.split("=")[0] == f"--model.{key}"]
        if given:  # jsonargparse's own message for a linked option is cryptic
            raise ValueError(
                f"model.{given[0]} comes from the data (the class folders of data.root/train); "
                f"remove --model.{given[0]} from the command line."
            )
        VisionLoRACLI(
            LoRAClassifier,
            ImageFolderDataModule,
            trainer_class=VisionLoRATrainer,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
        if os.environ.get("VISION_LORA_TRACEBACK"):
            raise
        message = str(err)
        if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met code, not tensors
            found = [line.strip() for line in message.splitlines() if "Unsupported global" in line]
            message = "refusing to unpickle a checkpoint that holds more than tensors and plain data" + (
                f" ({found[0]})" if found else ""
            )
        print(f"vision-lora: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
