"""The picture of a sweep: each trial's metric per validation pass, and the final value of each trial.

Drawn on a bare `Figure`: no pyplot state and no style change (optuna.visualization.matplotlib would switch every
later plot of the process to ggplot)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from .._io import atomic_write

__all__ = ["plot_trials"]

_COLOURS = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange", TrialState.FAIL: "tab:red"}


def plot_trials(trials: list[FrozenTrial], metric: str, maximize: bool, path: str | Path) -> Path:
    """Write `path` (PNG): left, `metric` after each validation pass of every trial (pruned trials dashed); right, the
    value of each finished trial by trial number and the best so far."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    curves, finals = fig.subplots(1, 2)
    for trial in trials:
        if not trial.intermediate_values:
            continue
        steps = sorted(trial.intermediate_values)
        style = "--" if trial.state == TrialState.PRUNED else "-"
        colour = _COLOURS.get(trial.state, "tab:gray")
        curves.plot(steps, [trial.intermediate_values[s] for s in steps], style, color=colour, alpha=0.7, marker=".")
    curves.set(xlabel="validation pass", ylabel=metric, title="per trial (dashed: pruned)")
    best, best_line = None, []
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        points = [(t.number, t.value) for t in done if t.state == state]
        if points:
            finals.scatter(*zip(*points, strict=True), color=_COLOURS[state], label=state.name.lower(), zorder=3)
    for trial in sorted(done, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and (best is None or (trial.value > best) == maximize):
            best = trial.value
        best_line.append((trial.number, float("nan") if best is None else best))
    if best is not None:
        finals.step(*zip(*best_line, strict=True), where="post", color="black", lw=1, label="best complete so far")
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    title = f"{len(done)} trials" + (f", {len(failed)} failed (not shown)" if failed else "")
    finals.set(xlabel="trial", ylabel=metric, title=title)
    if done:
        finals.legend(loc="best", fontsize="small")
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
