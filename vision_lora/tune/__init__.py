"""`vision-lora tune`: Optuna sweeps over the options of `vision-lora fit` (needs the [tune] extra).

- `space.py`: the search space file, checked against fit's options
- `storage.py`: the study's storage (heartbeats, retries), created once; the pruner
- `trial.py`: one trial as a fit process of its own, and the callback in it that reports and prunes
- `sweep.py`: the trial loop shared by every process of a study, best.yaml; `plot.py`: trials.png
"""

from __future__ import annotations

from .space import Param, SearchSpace, apply_options
from .sweep import Sweep, run_tune_command, tune
from .trial import TrialReporter

__all__ = ["Param", "SearchSpace", "Sweep", "TrialReporter", "apply_options", "run_tune_command", "tune"]
