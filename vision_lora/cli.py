"""The `vision-lora` command: LightningCLI with fit / validate / test / predict and an `export` subcommand, and
`serve` (see `serve.py`)."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .adapter import save_adapter, save_merged
from .baseline import evaluate_best, fit_head_probe, write_comparison
from .callbacks import AtomicCheckpointIO, BestCheckpoint, PlainProgress, PredictionWriter, SaveBestAdapter, run_dir
from .data import BadFileReport, FolderSource, ImageFolderDataModule, optimize_folder
from .module import LoRAClassifier
from .preemption import Preemption
from .recipe import Choice, augment_for, epochs_for, train_images
from .reports import EvalPredictions, History, write_reports
from .runs import OutputCheck

__all__ = ["VisionLoRACLI", "VisionLoRATrainer", "choose_recipe", "main", "resolve_checkpoint"]


def checkpoint_run_dir(ckpt_path: str | Path) -> Path:
    """The run a checkpoint belongs to: the folder above `checkpoints/`, else the checkpoint's own folder."""
    folder = Path(ckpt_path).parent
    return folder.parent if folder.name == "checkpoints" else folder


class VisionLoRATrainer(L.Trainer):
    """Lightning's Trainer plus `export` (merge the adapter and write ONNX, verified in onnxruntime and optionally
    int8, or timm weights); `validate`, `test` and `predict` of a checkpoint write into that checkpoint's run."""

    def _log_beside(self, ckpt_path: str | Path | None, output_dir: str | None, stage: str) -> None:
        """Log into `output_dir`, else `<the checkpoint's run>/<stage>/`, with a fresh CSVLogger: not into a new
        version folder, and without reusing the run's logger (a CSVLogger would replace the fit's metrics.csv, and
        the fit's config.yaml must stay the fit's)."""
        if output_dir is None and (ckpt_path is None or not Path(ckpt_path).is_file()):
            return
        out = Path(output_dir) if output_dir else checkpoint_run_dir(ckpt_path) / stage
        self.loggers = [CSVLogger(save_dir=str(out.parent), name="", version=out.name)]

    @contextmanager
    def _quiet_dirpath(self):
        # Evaluating beside the run moves the (unused) checkpoint folder, which Lightning reports: expected here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            yield

    def validate(
        self,
        model=None,
        dataloaders=None,
        ckpt_path=None,
        verbose=True,
        datamodule=None,
        weights_only=None,
        output_dir: str | None = None,
    ):
        """Lightning's `validate`; `output_dir`: where results go (default: `<the checkpoint's run>/validate/`)."""
        self._log_beside(ckpt_path, output_dir, "validate")
        with self._quiet_dirpath():
            return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def test(
        self,
        model=None,
        dataloaders=None,
        ckpt_path=None,
        verbose=True,
        datamodule=None,
        weights_only=None,
        output_dir: str | None = None,
    ):
        """Lightning's `test`; `output_dir`: where results go (default: `<the checkpoint's run>/test/`)."""
        self._log_beside(ckpt_path, output_dir, "test")
        with self._quiet_dirpath():
            return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(
        self,
        model=None,
        dataloaders=None,
        datamodule=None,
        return_predictions=None,
        ckpt_path=None,
        weights_only=None,
        output: str | None = None,
    ):
        """Lightning's `predict`; `output`: the predictions CSV (default:
        `<the checkpoint's run>/predict/predictions.csv`)."""
        self._log_beside(ckpt_path, None, "predict")
        if output is not None:
            for callback in self.callbacks:
                if isinstance(callback, PredictionWriter):
                    callback.filename = str(Path(output).absolute())
        with self._quiet_dirpath():
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)

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
            output: the file to write (for --format peft a directory; by default `peft_adapter`).
            format: "onnx" (verified against onnxruntime), "timm" (a merged state dict that
                `timm.create_model(name, num_classes=N, checkpoint_path=output)` loads; .safetensors or .pth), or
                "peft" (the unmerged adapter as `adapter_model.safetensors` + `adapter_config.json`, which
                `peft.PeftModel.from_pretrained(timm.create_model(name, num_classes=N), output)` loads).
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

        if format not in ("onnx", "timm", "peft"):
            raise ValueError(f"--format must be 'onnx', 'timm' or 'peft', got {format!r}.")
        if quantize not in (None, "int8") or (quantize and (fp16 or format != "onnx")):
            raise ValueError(f"--quantize takes 'int8', for a float32 ONNX export (no --fp16); got {quantize!r}.")
        trained = load_model(ckpt_path=ckpt_path, adapter=adapter)
        if format == "timm":
            path = save_merged(trained.model, output)
            rank_zero_info(f"Merged timm checkpoint written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return
        if format == "peft":
            path = save_adapter(trained.model, "peft_adapter" if output == "model.onnx" else output, format="peft")
            rank_zero_info(f"PEFT adapter of {trained.name} written to {path}")
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
    """Turn `fit --ckpt_path last` into the `last.ckpt` of this run and keep logging into that run's version folder.

    The run is the logger's `version` when given (the line printed on preemption gives it), else the only version
    under `<save_dir>/<name>` that has a last.ckpt: in a sweep, never the newest last.ckpt of some other run.
    Lightning alone would look for "last" only in the new run's (empty) directory and silently start from scratch.

    Raises:
        ValueError: several versions have a last.ckpt and none was chosen.
    """
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None)
    version = init_args.get("version") if init_args is not None else None
    if config.checkpoint.get("dirpath"):
        candidates = [Path(config.checkpoint.dirpath) / "last.ckpt"]
    elif init_args is not None and init_args.get("save_dir") is not None:
        root = Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
        if version is not None:
            run = root / (version if isinstance(version, str) else f"version_{version}")
            candidates = [run / "checkpoints" / "last.ckpt"]
        else:
            candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"))
    else:
        candidates = [Path(config.trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:  # as in Lightning, "last" may be set before the first run: start one, and say so
        rank_zero_warn("--ckpt_path last: no last.ckpt of this run exists yet; starting a new run.")
        config.ckpt_path = None
        return
    if len(candidates) > 1:
        versions = ", ".join(c.parent.parent.name for c in candidates)
        raise ValueError(
            f"--ckpt_path last: several runs under {root} have a last.ckpt ({versions}); choose yours with "
            f"--trainer.logger.init_args.version=N (or give each run its own --trainer.logger.init_args.name)."
        )
    last = candidates[0]
    config.ckpt_path = str(last)
    version_dir = last.parent.parent
    if init_args is not None and version_dir.name.startswith("version_") and not config.checkpoint.get("dirpath"):
        init_args.version = int(version_dir.name.removeprefix("version_"))
    rank_zero_info(f"Resuming from {last}")


def _runs_dir(config) -> Path:
    """Where the runs of a config are: the run itself for a run's own `config.yaml`, else checkpoint.dirpath, else
    `<logger save_dir>/<logger name>`, else `<default_root_dir>/lightning_logs`."""
    for path in config.get("config") or []:
        folder = Path(str(path)).parent
        if (folder / "checkpoints").is_dir():
            return folder
    if config.checkpoint.get("dirpath"):
        return Path(config.checkpoint.dirpath)
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is not None and init_args.get("save_dir") is not None:
        return Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
    return Path(config.trainer.get("default_root_dir") or "runs") / "lightning_logs"


def _checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints" if (run / "checkpoints").is_dir() else run


def _best_of(run: Path) -> Path:
    """The best checkpoint of a run, as its monitoring ModelCheckpoint recorded it in the newest checkpoint."""
    folder = _checkpoint_dir(run)
    newest = max(folder.glob("*.ckpt"), key=lambda c: c.stat().st_mtime)
    state = torch.load(newest, map_location="cpu", weights_only=True).get("callbacks", {})
    for key, value in state.items():
        if key.startswith("ModelCheckpoint") and value.get("monitor") and value.get("best_model_path"):
            best = folder / Path(value["best_model_path"]).name
            if best.is_file():
                return best
    bests = sorted(folder.glob("best*.ckpt"))
    if len(bests) == 1:
        return bests[0]
    raise ValueError(
        f"cannot tell the best checkpoint of {run}: "
        + (", ".join(map(str, bests)) or "it has no best*.ckpt")
        + "; pass --ckpt_path <file>."
    )


def resolve_checkpoint(which: str, runs_dir: str | Path) -> Path:
    """`--ckpt_path best` / `last`: that checkpoint of the newest run under `runs_dir` (a logger's
    `<save_dir>/<name>` holding `version_*` runs, one run, or a checkpoint folder).

    Raises:
        ValueError: no run there, or the newest runs were written at the same time (the candidates are listed).
    """
    root = Path(runs_dir)
    runs = [d for d in [*sorted(root.glob("version_*")), root] if any(_checkpoint_dir(d).glob("*.ckpt"))]
    if not runs:
        elsewhere = sorted(str(c.parent.parent) for c in root.parent.glob("*/version_*/checkpoints/*.ckpt"))
        hint = f" Runs elsewhere: {', '.join(sorted(set(elsewhere)))}." if elsewhere else ""
        raise ValueError(
            f"--ckpt_path {which}: no checkpoint under {root}.{hint} Pass the --config of the fit that wrote it, or "
            f"a checkpoint file."
        )

    def span(run: Path) -> tuple[float, float]:
        times = [c.stat().st_mtime for c in _checkpoint_dir(run).glob("*.ckpt")]
        times += [f.stat().st_mtime for f in (run / "config.yaml", run / "hparams.yaml") if f.is_file()]
        return min(times), max(times)

    runs.sort(key=lambda r: span(r)[1])
    if len(runs) > 1 and span(runs[-2])[1] > span(runs[-1])[0]:
        overlapping = [str(r) for r in runs if span(r)[1] > span(runs[-1])[0]]
        raise ValueError(
            f"--ckpt_path {which}: several runs under {root} were written at the same time ({', '.join(overlapping)}); "
            f"pass a checkpoint file."
        )
    run = runs[-1]
    if which == "best":
        return _best_of(run)
    last = _checkpoint_dir(run) / "last.ckpt"
    if not last.is_file():
        raise ValueError(f"--ckpt_path last: {run} has no last.ckpt; pass a checkpoint file.")
    return last


_LIGHTNING_CSV = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")


def choose_recipe(config) -> list[Choice]:
    """Fill in what the user of `fit` left to the data, in `config` itself (so the saved config.yaml is what ran):
    the epoch count when neither trainer.max_epochs nor trainer.max_steps is given, and data.augment "auto"."""
    data, trainer = config.data, config.trainer
    needs_epochs = trainer.get("max_epochs") is None and trainer.get("max_steps") in (None, -1)
    needs_augment = data.get("augment") == "auto"
    if data.get("root") is None or not (needs_epochs or needs_augment):
        return []
    images, classes = train_images(data.root, data.val_fraction, data.seed)
    choices = []
    if needs_epochs:
        trainer.max_epochs = epochs_for(images, data.batch_size)
        steps = -(-images // data.batch_size)
        reason = f"{images} training images, {steps} steps of {data.batch_size} per epoch"
        choices.append(Choice("trainer.max_epochs", trainer.max_epochs, reason))
    if needs_augment:
        data.augment = augment_for(images, classes)
        per_class = images / max(classes, 1)
        choices.append(Choice("data.augment", data.augment, f"{per_class:.0f} training images per class"))
    return choices


_LINKED = ("num_classes", "class_names")  # model options that the CLI fills in from the data
_DEFAULT_BACKBONE = inspect.signature(LoRAClassifier).parameters["backbone"].default


class VisionLoRACLI(LightningCLI):
    """LightningCLI for LoRAClassifier + ImageFolderDataModule: the data decides the head size and class names."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in _LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_argument(
            "--last_every_n_steps",
            type=int | None,
            default=None,
            help="Also refresh last.ckpt every N training steps (default: only at the end of each epoch).",
        )
        parser.add_argument(
            "--print_targets", action="store_true", help="Print the modules LoRA adapts and skips, then exit."
        )
        parser.add_argument(
            "--baseline",
            type=Literal["head"] | None,
            default=None,
            help="fit: first train the head-only probe with the same recipe (into <run>/baseline_head), then the LoRA "
            "run, and print both accuracies (test split, else val) at the end.",
        )
        parser.set_defaults(
            {
                "model.weights": "pretrained",  # the Python API keeps "random"; a user of the command wants these
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
            History(),
            EvalPredictions(),
            Preemption(),
            OutputCheck(),
        ]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:0] = callbacks
        # Lightning's live bar writes nothing useful into a log file (nohup, SLURM, CI): plain lines there instead.
        bar = trainer.progress_bar_callback
        if type(bar) in (RichProgressBar, TQDMProgressBar) and not sys.stdout.isatty():
            trainer.callbacks[trainer.callbacks.index(bar)] = PlainProgress()
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
        # Before Lightning reads the hyperparameters of --ckpt_path (fit's own `last` is resolved later).
        subcommand = self.config.get("subcommand")
        config = self._subcommand_config()
        if subcommand != "fit" and config.get("ckpt_path") in ("best", "last"):
            config.ckpt_path = str(resolve_checkpoint(config.ckpt_path, _runs_dir(config)))
            rank_zero_info(f"--ckpt_path: {config.ckpt_path}")
        # Next, Lightning replaces the model options with the hyperparameters stored in --ckpt_path, and the links
        # replace num_classes / class_names with the data's: keep what the user asked for, to check it against both.
        model = self._subcommand_config().get("model") or {}
        self._requested = {key: model.get(key) for key in ("backbone", *_LINKED)}

    def _subcommand_config(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if config.get("print_targets"):
            from .inject import describe_targets

            print(describe_targets(config.model.backbone, **config.model.as_dict()))
            sys.exit(0)
        requested, stored = self._requested.get("backbone"), config.model.get("backbone")
        if requested not in (None, _DEFAULT_BACKBONE, stored):
            raise ValueError(
                f"{config.ckpt_path} was trained on {stored!r} but model.backbone is {requested!r}; leave "
                f"model.backbone out (the checkpoint sets it) or pass a checkpoint of {requested!r}."
            )
        logger = config.trainer.get("logger")
        if getattr(logger, "class_path", None) in _LIGHTNING_CSV:  # its version pick races, and it deletes metrics.csv
            logger.class_path = "vision_lora.runs.RunLogger"
        if self.config.get("subcommand") == "fit":
            if config.get("ckpt_path") == "last":
                _resolve_last_checkpoint(config)
            for choice in choose_recipe(config):
                rank_zero_info(str(choice))

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

    # -- what a run shows ---------------------------------------------------------------------------------------

    def _callback(self, kind: type) -> L.Callback | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, kind)), None)

    def _report(self, out_dir: Path, history: list[dict] | None) -> None:
        predictions = getattr(self._callback(EvalPredictions), "predictions", None)
        checkpoint = self.trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None) or "val_acc"
        mode = getattr(checkpoint, "mode", "max")
        if self.trainer.is_global_zero:
            for path in write_reports(out_dir, self.model.class_names, predictions, history, monitor, mode):
                rank_zero_info(f"Wrote {path}")

    def before_fit(self) -> None:
        """With `--baseline head`: train the head-only probe first, into `<run>/baseline_head`."""
        config = self._subcommand_config()
        self._baseline = None
        if config.get("baseline") != "head":
            return
        if self.trainer.world_size > 1:
            raise ValueError("--baseline head runs on one device; drop --baseline or use --trainer.devices=1.")
        for logger in self.trainer.loggers:  # the run's own logs start first: a CSVLogger then keeps the probe's folder
            _ = logger.experiment
        self._baseline = fit_head_probe(
            self.model, self.datamodule, config.trainer.as_dict(), run_dir(self.trainer) / "baseline_head"
        )
        if config.get("seed_everything") is not None:  # the LoRA run as it would be without the probe before it
            L.seed_everything(config.seed_everything)

    def after_fit(self) -> None:
        """One more validation pass, on the best checkpoint, for the confusion matrix and the errors; then the
        curves, all in the run directory. Nothing of this pass is logged. With `--baseline head`, both accuracies."""
        trainer = self.trainer
        out_dir = run_dir(trainer)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        # Taken first: loading the best checkpoint below also restores the History of that epoch.
        history = list(getattr(self._callback(History), "epochs", None) or [])
        if not trainer.interrupted and trainer.limit_val_batches != 0:
            loggers, trainer.loggers = trainer.loggers, []
            try:
                ckpt = best if best and Path(best).is_file() else None
                # Lightning's own validate: this pass writes nothing of its own beside the run.
                L.Trainer.validate(trainer, self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
            finally:
                trainer.loggers = loggers
        self._report(out_dir, history)
        if getattr(self, "_baseline", None) is not None and not trainer.interrupted:
            lora = evaluate_best(trainer, self.model, self.datamodule, "LoRA")
            for line in write_comparison(out_dir / "baseline.json", self._baseline, lora):
                rank_zero_info(line)

    def after_validate(self) -> None:
        self._report(run_dir(self.trainer), None)

    def after_test(self) -> None:
        self._report(run_dir(self.trainer), None)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}


TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "vision_lora.runs.RunLogger", "init_args": {"save_dir": "runs"}},
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


class _NoTips(logging.Filter):
    """Drops Lightning's promotional "💡 Tip:" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _hide_tips() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def main(args: list[str] | None = None) -> None:
    """Entry point of `vision-lora`; `args` replaces `sys.argv[1:]` (for tests and notebooks).

    Errors a user can fix (bad paths, options, data) end with one line on stderr and exit status 1; set
    VISION_LORA_TRACEBACK=1 to see the traceback.
    """
    _hide_tips()
    try:
        argv = sys.argv[1:] if args is None else args
        if argv[:1] == ["optimize"]:
            return optimize(argv[1:])
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
    except (ValueError, OSError, pickle.UnpicklingError) as err:  # OSError: a full disk, an unwritable folder
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
