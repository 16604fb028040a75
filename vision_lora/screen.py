"""The run-time half of `--recipe auto`: a callback that screens candidate recipes on the run's own val split inside
one `fit`, continues the best from its own state, and ends the run when the val curve stops improving.

Everything happens in the one Trainer of the run, so checkpoints, preemption, resume and DDP work as for any run:
epochs `[k·rung, (k+1)·rung)` train candidate k from the run's starting weights; after the last rung the winner's
weights, optimizer state and best checkpoint come back and it trains on. The callback's state (each candidate's
figures and rung-end state) is saved in every checkpoint, so a resumed run continues the screen or the winner where
it stopped.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from .recipe import Candidate, Length

__all__ = ["CandidateResult", "RecipeScreen"]


@dataclass
class CandidateResult:
    """What a candidate reached on val in its rung: the best epoch's monitored value and val_loss."""

    name: str
    options: dict[str, Any]
    best: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    steps: int = 0
    history: list[float] = field(default_factory=list)

    def better_than(self, other: CandidateResult, mode: str) -> bool:
        """Ranked on the monitored value, ties to the lower val_loss (the best-checkpoint rule)."""
        return self.best is not None and _improves(self.best, self.val_loss, other.best, other.val_loss, mode)


def _improves(value: float, loss: float | None, best: float | None, best_loss: float | None, mode: str) -> bool:
    if best is None:
        return True
    if value != best:
        return value > best if mode == "max" else value < best
    return loss is not None and (best_loss is None or loss < best_loss)


class RecipeScreen(L.Callback):
    """Screen `candidates` for `length.rung` epochs each, continue the best; stop on the val curve (`length`).

    Args:
        candidates: the recipes to try, in order; with one, there is no screen, only the length rule.
        length: rung, patience, minimum and cap, in epochs.
        monitor: the metric that ranks candidates and epochs (as the best checkpoint monitors it).
        mode: "max" or "min" for `monitor`.
        tie_break: the metric that breaks ties, lower is better.
        apply: sets a candidate's options on the datamodule (its training data must follow them).
        stop_on_curve: end the run when the winner's val curve stops improving (False: the user gave the length).
    """

    def __init__(
        self,
        candidates: list[Candidate],
        length: Length,
        monitor: str = "val_acc",
        mode: str = "max",
        tie_break: str = "val_loss",
        apply: Callable[[L.LightningDataModule, Candidate], None] | None = None,
        stop_on_curve: bool = True,
    ) -> None:
        self.candidates = candidates
        self.length = length
        self.monitor, self.mode, self.tie_break = monitor, mode, tie_break
        self.apply, self.stop_on_curve = apply, stop_on_curve
        self.results = [CandidateResult(c.name, dict(c.options)) for c in candidates]
        self.index = 0  # the candidate training now
        self.winner: int | None = None if len(candidates) > 1 else 0
        self.pending: int | None = None  # the candidate whose state is loaded at the next epoch start
        self.states: dict[int | str, dict[str, Any]] = {}  # rung-end states by candidate, and "initial"
        self.since_best = 0
        self._trainer: L.Trainer | None = None

    @property
    def screening(self) -> bool:
        return self.winner is None or self.pending is not None

    @property
    def screen_epochs(self) -> int:
        """Epochs the losing candidates cost (the winner's own rung counts as its own training)."""
        return (len(self.candidates) - 1) * self.length.rung

    # -- state of the model, optimizer and best checkpoint -------------------------------------------------------

    def _best_callback(self, trainer: L.Trainer) -> ModelCheckpoint | None:
        callback = trainer.checkpoint_callback
        return callback if isinstance(callback, ModelCheckpoint) and callback.monitor else None

    def _capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        keys = pl_module.trainable_state_keys()
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in keys}
        optimizers = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]  # Adam's moments change in place
        best = self._best_callback(trainer)
        best_state = copy.deepcopy(best.state_dict()) if best else None
        return {"weights": weights, "optimizers": optimizers, "best": best_state}

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, Any]) -> None:
        pl_module.load_state_dict(state["weights"], strict=False)
        for optimizer, saved in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        best = self._best_callback(trainer)
        if best is not None:
            _set_best_state(best, state["best"])

    # -- hooks ---------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and self.screening:
            trainer.reload_dataloaders_every_n_epochs = 1  # each candidate's own training transform
            self._apply(self.pending if self.pending is not None else self.index)

    def _apply(self, index: int) -> None:
        if self.apply is not None and self._trainer is not None and self._trainer.datamodule is not None:
            self.apply(self._trainer.datamodule, self.candidates[index])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.screening and "initial" not in self.states:
            self.states["initial"] = self._capture(trainer, pl_module)
            names = ", ".join(c.name for c in self.candidates)
            rank_zero_info(
                f"recipe: screening {names} on val, {self.length.rung} epoch(s) each; the best trains on "
                f"(at least {self.length.min_epochs}, at most {self.length.max_epochs} epochs in all)"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pending is None:
            return
        best = self._best_callback(trainer)
        if best is not None:  # the outgoing candidate's best checkpoint, now that its last epoch was saved
            self.states[self.index]["best"] = copy.deepcopy(best.state_dict())
        target = self.pending
        if self.winner is None:
            self._restore(trainer, pl_module, self.states["initial"])
        else:
            self._drop_losing_checkpoints(trainer, target)
            self._restore(trainer, pl_module, self.states[target])
            self.states = {}  # decided: nothing of the screen is needed again
            trainer.reload_dataloaders_every_n_epochs = 0
        self.index, self.pending = target, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING  # not the evaluation passes after the fit
        if not fitting or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        loss = trainer.callback_metrics.get(self.tie_break)
        loss = float(loss) if loss is not None else None
        result = self.results[self.index]
        improved = _improves(value, loss, result.best, result.val_loss, self.mode)
        if improved:
            result.best, result.val_loss, result.best_epoch = value, loss, result.epochs
        result.epochs += 1
        result.steps += int(trainer.global_step) - sum(r.steps for r in self.results)
        result.history.append(value)
        if self.winner is None:
            if result.epochs >= self.length.rung:
                self._end_rung(trainer, pl_module)
            return
        # The length follows the monitored value alone (a falling val_loss on a saturated val split is no reason to
        # go on), as Lightning's EarlyStopping does.
        self.since_best = self._since_best(result)
        if self.stop_on_curve:
            self._check_stop(trainer, result)

    def _end_rung(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The current candidate's rung is over: keep its state, then start the next candidate or the winner."""
        self.states[self.index] = self._capture(trainer, pl_module)
        if self.index + 1 < len(self.candidates):
            self.pending = self.index + 1  # it starts from the run's starting state, with no best checkpoint yet
            self._apply(self.pending)
            return
        winner = 0
        for i, result in enumerate(self.results):
            if result.better_than(self.results[winner], self.mode):
                winner = i
        self.winner, self.pending = winner, winner
        self._apply(winner)
        self.since_best = self._since_best(self.results[winner])
        for line in self.table():
            rank_zero_info(line)

    def _drop_losing_checkpoints(self, trainer: L.Trainer, winner: int) -> None:
        """The losers' best checkpoints go: the run's best checkpoint is the winner's."""
        if not trainer.is_global_zero:
            return
        keep = (self.states[winner].get("best") or {}).get("best_model_path")
        for i, state in self.states.items():
            path = (state.get("best") or {}).get("best_model_path") if i != winner else None
            if path and path != keep and Path(path).is_file():
                Path(path).unlink()

    def _since_best(self, result: CandidateResult) -> int:
        """Epochs since `result`'s monitored value first reached its best."""
        pick = max if self.mode == "max" else min
        history = result.history
        return len(history) - 1 - history.index(pick(history))

    def _check_stop(self, trainer: L.Trainer, result: CandidateResult) -> None:
        epochs, length = result.epochs, self.length
        if epochs < length.min_epochs:
            return
        if self.since_best >= length.patience:
            trainer.should_stop = True
            rank_zero_info(
                f"recipe: {self.monitor} has not improved for {self.since_best} epochs; stopping after {epochs} "
                f"epochs of {result.name}"
            )
        elif epochs >= length.max_epochs:
            trainer.should_stop = True
            if self.since_best == 0:
                rank_zero_info(
                    f"recipe: {self.monitor} was still improving at the cap of {length.max_epochs} epochs; "
                    "more epochs (--trainer.max_epochs) may help"
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.winner is None or trainer.interrupted:
            return
        total = int(trainer.global_step)
        own = self.results[self.winner].steps
        rank_zero_info(
            f"recipe: optimizer steps {total} in all = {own} of the winner ({self.candidates[self.winner].name}) + "
            f"{total - own} of the screen; {total / max(own, 1):.2f}x one run of the chosen length"
        )

    # -- report and state ----------------------------------------------------------------------------------------

    def table(self) -> list[str]:
        """The screen's table: one line per candidate, the winner marked."""
        lines = [f"{'candidate':<12} {'options':<28} {self.monitor:>9} {self.tie_break:>9} {'epochs':>6}"]
        for i, r in enumerate(self.results):
            options = " ".join(f"{k}={v}" for k, v in r.options.items())
            best = f"{r.best:.4f}" if r.best is not None else "-"
            loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
            mark = "  <- continued" if i == self.winner else ""
            lines.append(f"{r.name:<12} {options:<28} {best:>9} {loss:>9} {r.epochs:>6}{mark}")
        return ["recipe: " + line for line in lines]

    def write_table(self, path: Path) -> None:
        """The candidates' figures as CSV (`screen.csv` in the run folder)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["candidate", "options", self.monitor, self.tie_break, "best_epoch", "epochs", "steps",
                             "winner"])  # fmt: skip
            for i, r in enumerate(self.results):
                options = " ".join(f"{k}={v}" for k, v in r.options.items())
                writer.writerow([r.name, options, r.best, r.val_loss, r.best_epoch, r.epochs, r.steps,
                                 int(i == self.winner)])  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": [c.name for c in self.candidates],
            "results": [asdict(r) for r in self.results],
            "index": self.index,
            "winner": self.winner,
            "pending": self.pending,
            "states": self.states,
            "since_best": self.since_best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("names") != [c.name for c in self.candidates]:
            return  # another screen (or none) wrote it: start this one afresh
        self.results = [CandidateResult(**r) for r in state_dict["results"]]
        self.index, self.winner, self.pending = state_dict["index"], state_dict["winner"], state_dict["pending"]
        self.states, self.since_best = state_dict["states"], state_dict["since_best"]
        if self._trainer is not None:
            self._trainer.reload_dataloaders_every_n_epochs = 1 if self.screening else 0
            self._apply(self.pending if self.pending is not None else self.index)


def _set_best_state(callback: ModelCheckpoint, state: dict[str, Any] | None) -> None:
    """Replace the best-checkpoint bookkeeping of `callback` (Lightning's load_state_dict leaves some of it)."""
    if state is None:
        return
    callback.best_model_score = state.get("best_model_score")
    callback.best_model_path = state.get("best_model_path", "")
    callback.best_k_models = dict(state.get("best_k_models", {}))
    callback.kth_best_model_path = state.get("kth_best_model_path", "")
    callback.kth_value = state.get("kth_value", callback.kth_value)
    if hasattr(callback, "_tie_value"):
        callback._tie_value = state.get("tie_value")
