"""Opening the study of `vision-lora tune`: its storage (an Optuna RDB URL, with heartbeats), created once and
shared by every process of a sweep, and the pruner every trial process rebuilds."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, StorageInternalError

from ..errors import VisionLoRAError

__all__ = ["make_pruner", "open_storage", "open_study", "retry"]

T = TypeVar("T")
_TRIES = 8  # lock contention on SQLite and table-creation races between processes starting together


def _transient(err: BaseException) -> bool:
    if isinstance(err, StorageInternalError):
        return True
    if isinstance(err, optuna.exceptions.OptunaError):  # DuplicatedStudyError also says "already exists"
        return False
    text = str(err).lower()
    return any(s in text for s in ("database is locked", "already exists", "unique constraint", "duplicate"))


def retry(call: Callable[[], T], tries: int = _TRIES) -> T:
    """`call()`, tried again after a short random wait when the storage is busy (SQLite's lock, a table another
    process is creating)."""
    for attempt in range(tries):
        try:
            return call()
        except Exception as err:  # sqlalchemy's errors reach us unwrapped from create_all and the version check
            if attempt == tries - 1 or not _transient(err):
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


def make_pruner() -> optuna.pruners.BasePruner:
    """Asynchronous successive halving, one rung per doubling of validation passes (1, 2, 4, ...): at each rung a trial
    goes on only if it is in the better half of the trials that reached it. Deterministic, so that each trial process
    rebuilds the same pruner (Hyperband's brackets would also depend on the study name)."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def open_storage(url: str, heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    """The RDB storage at `url`; with `heartbeat` seconds, a running trial whose heartbeat is older than twice that
    is failed as dead.

    Raises:
        VisionLoRAError: the storage cannot be reached or opened.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    beat = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat} if heartbeat else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return retry(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine, **beat))
    except Exception as err:
        message = " ".join(str(err).split())[:300]
        raise VisionLoRAError(f"cannot open --storage {url}: {type(err).__name__}: {message}") from None


def open_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    direction: str,
    resume: bool,
    attrs: dict[str, Any],
) -> tuple[optuna.Study, bool]:
    """The study `name` (created when new), and whether this process created it. `attrs` (the search space, the
    metric) are stored in a new study and must match those of a resumed one.

    Raises:
        VisionLoRAError: the study exists and `resume` is False, or it was made for other `attrs` or `direction`.
    """
    settings = dict(study_name=name, storage=storage, pruner=make_pruner())
    created = False
    try:
        study = retry(lambda: optuna.create_study(direction=direction, **settings))
        created = True
    except DuplicatedStudyError:
        if not resume:
            raise VisionLoRAError(
                f"the study {name!r} already exists in {storage.url}: pass --resume to continue it, or another "
                "--study_name (or --output) for a new one."
            ) from None
        study = retry(lambda: optuna.load_study(**settings))
    if created:
        for key, value in attrs.items():
            retry(lambda key=key, value=value: study.set_user_attr(key, value))
        return study, True
    stored = study.user_attrs
    if study.direction.name.lower() != direction:
        raise VisionLoRAError(
            f"the study {name!r} was made to {study.direction.name.lower()} its metric, not {direction}; pass "
            f"--direction {study.direction.name.lower()} or another --study_name."
        )
    for key, value in attrs.items():
        if key not in stored:  # its creator is still writing them, or it was made by hand
            retry(lambda key=key, value=value: study.set_user_attr(key, value))
        elif stored[key] != value:
            raise VisionLoRAError(
                f"the study {name!r} was made with another {key.replace('_', ' ')} ({_short(stored[key])}); "
                "resume it with the same one, or pass another --study_name for this one."
            )
    return study, False


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:119] + "…"
