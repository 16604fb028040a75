"""The Trainer commands of `vision-lora` (fit, validate, test, predict): LightningCLI for LoRAClassifier +
ImageFolderDataModule with the project's defaults, callbacks and run reports, and a Trainer whose evaluations write
beside the run of their checkpoint."""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .averaging import TrainableEMA
from .baseline import evaluate_best, fit_head_probe, write_comparison
from .callbacks import (
    AtomicCheckpointIO,
    BadFileReport,
    BestCheckpoint,
    PlainProgress,
    PredictionWriter,
    SaveBestAdapter,
    run_dir,
)
from .checkpoint import read_checkpoint
from .data import ImageFolderDataModule
from .data.datamodule import train_counts_of
from .data.sources import class_counts_of
from .errors import VisionLoRAError
from .lora.config import LoRAConfig
from .lora.inject import describe_targets
from .module import LoRAClassifier
from .preemption import Preemption
from .recipe import RECIPES, Candidate, Plan, choose_recipe
from .reports import EvalPredictions, History, write_reports
from .reports_cam import add_cams
from .runs import OutputCheck, checkpoint_run_dir, resolve_checkpoint, resolve_last_for_fit, runs_dir_of
from .screen import RecipeScreen
from .tasks import monitor_for_task

__all__ = ["TRAINER_DEFAULTS", "VisionLoRACLI", "VisionLoRATrainer", "run_trainer_command"]


class VisionLoRATrainer(L.Trainer):
    """Lightning's Trainer whose `validate`, `test` and `predict` of a checkpoint write into that checkpoint's run."""

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


def _apply_candidate(data: L.LightningDataModule, candidate: Candidate) -> None:
    """Train with a screened candidate's options from the next epoch on: its augmentation and sampler (the data) and
    its class weights (the model)."""
    options = candidate.options
    if "data.augment" in options:
        data.use_augment(options["data.augment"])
    if "data.sampler" in options:
        data.use_sampler(options["data.sampler"])
    if "model.class_weights" in options:
        data.trainer.lightning_module.use_class_weights(options["model.class_weights"])


def _stand_alone_resume(config) -> None:
    """A run resumed from a checkpoint that started from `--model.init_adapter DIR` rebuilds its LoRA layers from the
    options the checkpoint recorded, not from DIR, which may be gone (its weights are in the checkpoint)."""
    ckpt = config.get("ckpt_path")
    if not ckpt or not config.model.get("init_adapter") or not Path(ckpt).is_file():
        return
    hparams = read_checkpoint(ckpt)["hyper_parameters"]
    if hparams.get("init_adapter") is not None:
        return  # written before checkpoints stood alone: it needs DIR
    for key in ("init_adapter", *LoRAConfig.__dataclass_fields__):
        if key in hparams:
            config.model[key] = hparams[key]


_LIGHTNING_CSV = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")

_LINKED = ("num_classes", "class_names", "task")  # model options that the CLI fills in from the data
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
        parser.add_argument(
            "--recipe",
            type=Literal[RECIPES],
            default="auto",
            help="fit: 'auto' decides what the options leave open on the run's own val split: data.augment 'auto' by "
            "a short screen of candidates (the best continues), the length by the val curve when neither "
            "trainer.max_epochs nor trainer.max_steps is given. 'off': no screen (augment 'auto' is 'light').",
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
        # issue 24 hook: a multi-label run's checkpoints (and screen) monitor val_map where val_acc was asked.
        checkpoint = self._get(self.config_init, "checkpoint", default=None)
        if monitor_for_task(checkpoint, getattr(self.datamodule, "task", None)):
            self._subcommand_config().checkpoint.monitor = checkpoint.monitor
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
        screen = self._screen()
        if screen is not None:
            callbacks.append(screen)
        trainer = super().instantiate_trainer(**kwargs)
        if (
            screen is not None
            and len(screen.candidates) > 1
            and any(isinstance(c, TrainableEMA) for c in trainer.callbacks)
        ):
            raise VisionLoRAError(
                "Weight averaging (TrainableEMA) cannot run in the recipe screen: give --data.augment or --recipe off."
            )
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
            config.ckpt_path = str(resolve_checkpoint(config.ckpt_path, runs_dir_of(config)))
            rank_zero_info(f"--ckpt_path: {config.ckpt_path}")
        # Next, Lightning replaces the model options with the hyperparameters stored in --ckpt_path, and the links
        # replace num_classes / class_names with the data's: keep what the user asked for, to check it against both.
        model = self._subcommand_config().get("model") or {}
        self._requested = {key: model.get(key) for key in ("backbone", *_LINKED)}
        trainer = self._subcommand_config().get("trainer") or {}
        self._user_length = trainer.get("max_epochs") is not None or trainer.get("max_steps") not in (None, -1)

    def _subcommand_config(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if config.get("print_targets"):
            print(describe_targets(config.model.backbone, **config.model.as_dict()))
            sys.exit(0)
        requested, stored = self._requested.get("backbone"), config.model.get("backbone")
        if requested not in (None, _DEFAULT_BACKBONE, stored):
            raise VisionLoRAError(
                f"{config.ckpt_path} was trained on {stored!r} but model.backbone is {requested!r}; leave "
                f"model.backbone out (the checkpoint sets it) or pass a checkpoint of {requested!r}."
            )
        logger = config.trainer.get("logger")
        if getattr(logger, "class_path", None) in _LIGHTNING_CSV:  # its version pick races, and it deletes metrics.csv
            logger.class_path = "vision_lora.runs.RunLogger"
        if self.config.get("subcommand") == "fit":
            if config.get("ckpt_path") == "last":
                resolve_last_for_fit(config)
                _stand_alone_resume(config)
            counts = partial(train_counts_of, config.data)  # issue 24: label files too
            self._plan = choose_recipe(config, counts, partial(class_counts_of, config.data))
            for choice in self._plan.choices:
                rank_zero_info(str(choice))

    def _screen(self) -> RecipeScreen | None:
        """The callback that carries out the recipe plan of `fit` (a screen and / or a curve-decided length)."""
        plan: Plan | None = getattr(self, "_plan", None)
        if plan is None or plan.length is None or self.config.get("subcommand") != "fit":
            return None
        config = self._subcommand_config()
        candidates = plan.candidates or [Candidate("run", {"data.augment": config.data.augment})]
        needs_length = config.trainer.get("max_steps") in (None, -1) and not self._user_length
        return RecipeScreen(
            candidates,
            plan.length,
            monitor=config.checkpoint.get("monitor") or "val_acc",
            mode=config.checkpoint.get("mode") or "max",
            apply=_apply_candidate,
            stop_on_curve=needs_length,
        )

    def _record_decision(self, out_dir: Path) -> None:
        """After a fit that screened recipes: the table as `screen.csv`, and the winner in the run's `config.yaml`
        (its augmentation, `recipe: off`, the length left to the val curve again), so that rerunning the config
        trains the winner without the screen."""
        screen = self._callback(RecipeScreen)
        if screen is None or screen.winner is None or len(screen.candidates) < 2 or not self.trainer.is_global_zero:
            return
        screen.write_table(out_dir / "screen.csv")
        saver = self._callback(SaveConfigCallback)
        if saver is None:
            return
        config = saver.config
        for key, value in screen.candidates[screen.winner].options.items():
            group, name = key.split(".", 1)
            config[group][name] = value
        config.recipe = "off"
        if not self._user_length:
            config.trainer.max_epochs = None
        saver.parser.save(config, str(out_dir / saver.config_filename), skip_none=False, overwrite=True)
        rank_zero_info(f"recipe: wrote the winner into {out_dir / saver.config_filename}; screen table: screen.csv")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        data = self.datamodule
        if not isinstance(data, ImageFolderDataModule) or data.num_classes is None:
            return
        found = {"num_classes": data.num_classes, "class_names": data.class_names, "task": data.task}
        for key in _LINKED:
            requested = self._requested.get(key)
            if requested is not None and requested != found[key]:
                raise VisionLoRAError(
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
            net = getattr(self.model, "model", None)
            if predictions is not None and predictions.inputs and isinstance(net, nn.Module):
                predictions, why = add_cams(predictions, net)  # on a copy of the net: this one is left as it is
                if why:
                    rank_zero_info(f"errors.png without Grad-CAM overlays ({why})")
            for path in write_reports(out_dir, self.model.class_names, predictions, history, monitor, mode):
                rank_zero_info(f"Wrote {path}")

    def before_fit(self) -> None:
        """With `--baseline head`: train the head-only probe first, into `<run>/baseline_head`."""
        config = self._subcommand_config()
        self._baseline = None
        if config.get("baseline") != "head":
            return
        if self.trainer.world_size > 1:
            raise VisionLoRAError("--baseline head runs on one device; drop --baseline or use --trainer.devices=1.")
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
        if not trainer.interrupted:
            self._record_decision(out_dir)  # found on every rank: finding it is a collective call
        if getattr(self, "_baseline", None) is not None and not trainer.interrupted:
            lora = evaluate_best(trainer, self.model, self.datamodule, "LoRA")
            for line in write_comparison(out_dir / "baseline.json", self._baseline, lora):
                rank_zero_info(line)

    def after_validate(self) -> None:
        self._report(run_dir(self.trainer), None)

    def after_test(self) -> None:
        self._report(run_dir(self.trainer), None)


class _NoTips(logging.Filter):
    """Drops Lightning's promotional "💡 Tip:" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _hide_tips() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "vision_lora.runs.RunLogger", "init_args": {"save_dir": "runs"}},
}


def run_trainer_command(args: list[str] | None) -> None:
    """Run `vision-lora fit|validate|test|predict ARGS` (`args` with the command first; None: `sys.argv[1:]`).

    Raises:
        VisionLoRAError: an option the CLI fills in from the data was given.
    """
    _hide_tips()
    argv = sys.argv[1:] if args is None else args
    given = [key for key in _LINKED for arg in argv if arg.split("=")[0] == f"--model.{key}"]
    if given:  # jsonargparse's own message for a linked option is cryptic
        raise VisionLoRAError(
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
        parser_kwargs={"prog": "vision-lora", "description": "LoRA fine-tuning of timm image classifiers."},
        args=args,
    )
