"""The `vision-lora` command: LightningCLI with fit / validate / test / predict and an `export` subcommand, and
`serve` (see `serve.py`)."""

from __future__ import annotations

import inspect
import os
import pickle
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .adapter import save_merged
from .callbacks import AtomicCheckpointIO, PredictionWriter, SaveBestAdapter
from .data import ImageFolderDataModule
from .module import LoRAClassifier

__all__ = ["VisionLoRACLI", "VisionLoRATrainer", "main"]


class VisionLoRATrainer(L.Trainer):
    """Lightning's Trainer plus `export`: merge the adapter and write ONNX (verified in onnxruntime, optionally int8)
    or timm weights."""

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
        quantize: str | None = None,
        calib_dir: str | None = None,
        calib_split: str = "train",
        calib_images: int = 256,
        min_agreement: float = 0.99,
    ) -> None:
        """Merge LoRA into the backbone and export it.

        Args:
            model: unused (the model is rebuilt from `ckpt_path` or `adapter`).
            datamodule: its `--data.root` gives the images of `--quantize int8` when the checkpoint's is not wanted.
            ckpt_path: a checkpoint written by `vision-lora fit`.
            adapter: an adapter directory written by `vision-lora fit` (instead of `ckpt_path`).
            output: the file to write.
            format: "onnx" (verified against onnxruntime) or "timm" (a merged state dict that
                `timm.create_model(name, num_classes=N, checkpoint_path=output)` loads; .safetensors or .pth).
            opset: ONNX opset version.
            fp16: write fp16 ONNX weights (verified with a looser tolerance).
            verify_dir: a folder of real images to also verify the ONNX file on.
            verify_limit: at most this many images of `verify_dir`.
            quantize: "int8": `output` becomes a static int8 (QDQ) model and the verified float32 one is written
                beside it as `<output stem>.fp32.onnx`.
            calib_dir: images to calibrate int8 activations on; by default `calib_split` of the data root.
            calib_split: the split of the data root (the checkpoint's, or --data.root) to calibrate on.
            calib_images: at most this many calibration images.
            min_agreement: the int8 file is not written when its top-1 agreement with float32 on the test split
                (else val) is lower.
        """
        from .export import export_onnx, image_files, load_model, preprocess_files, quantize_trained

        if format not in ("onnx", "timm"):
            raise ValueError(f"--format must be 'onnx' or 'timm', got {format!r}.")
        if quantize not in (None, "int8") or (quantize and (fp16 or format != "onnx")):
            raise ValueError(f"--quantize takes 'int8', for a float32 ONNX export (no --fp16); got {quantize!r}.")
        trained = load_model(ckpt_path=ckpt_path, adapter=adapter)
        if format == "timm":
            path = save_merged(trained.model, output)
            rank_zero_info(f"Merged timm checkpoint written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return
        images = preprocess_files(image_files(verify_dir, verify_limit), trained.data_config) if verify_dir else None
        fp32_path = Path(output).with_suffix(".fp32.onnx") if quantize else output
        report = export_onnx(
            trained.model,
            fp32_path,
            class_names=trained.class_names,
            data_config=trained.data_config,
            opset=opset,
            fp16=fp16,
            images=images,
        )
        rank_zero_info(str(report))
        if quantize:
            root = getattr(datamodule, "root", None)
            settings = dict(calib_split=calib_split, calib_images=calib_images, min_agreement=min_agreement)
            report = quantize_trained(trained, fp32_path, output, data_root=root, calib_dir=calib_dir, **settings)
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
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # see instantiate_trainer
                "checkpoint.filename": "best-{epoch:02d}-{val_acc:.4f}",
            }
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        callbacks = [SaveBestAdapter(), PredictionWriter(), LearningRateMonitor(logging_interval="epoch")]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:0] = callbacks
        # `last.ckpt` after every epoch. ModelCheckpoint(save_last=True) refreshes it only when the monitored metric
        # improves, so a resumed run could silently lose epochs. Appended: `trainer.checkpoint_callback` (the first
        # one) stays the monitored "best" callback.
        if trainer.checkpoint_callback is not None:
            trainer.callbacks.append(ModelCheckpoint(filename="last", enable_version_counter=False))
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
                    f"model.{key}={requested} disagrees with the data: {data.root / 'train'} has {data.num_classes} "
                    f"class folders ({', '.join(data.class_names)}). "
                    f"Remove model.{key} from the config; vision-lora takes it from the data."
                )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}


TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


def main(args: list[str] | None = None) -> None:
    """Entry point of `vision-lora`; `args` replaces `sys.argv[1:]` (for tests and notebooks).

    Errors a user can fix (bad paths, options, data) end with one line on stderr and exit status 1; set
    VISION_LORA_TRACEBACK=1 to see the traceback.
    """
    try:
        argv = sys.argv[1:] if args is None else args
        if argv[:1] == ["serve"]:  # not a LightningCLI subcommand: no Trainer, and --model names the file to serve
            from jsonargparse import CLI

            from .serve import serve

            CLI(serve, args=argv[1:], prog="vision-lora serve")
            return
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
