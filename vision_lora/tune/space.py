"""The search space of `vision-lora tune`: one key per dotted option of `fit`, read from a YAML file and checked
before any trial runs.

```yaml
model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
model.r: {type: int, low: 4, high: 32, step: 4}
data.augment: {type: categorical, choices: [none, light, standard]}
trainer.max_epochs: 3            # not a {type: ...} mapping: fixed for every trial
```
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import VisionLoRAError

__all__ = ["Param", "SearchSpace", "apply_options", "fit_options", "load_yaml"]

_SPEC_KEYS = {"type", "low", "high", "step", "log", "choices"}
_TYPES = ("float", "int", "categorical")
_CHOICE_TYPES = (str, int, float, bool, type(None))  # what Optuna stores as a categorical choice


@dataclass(frozen=True)
class Param:
    """One searched option: its dotted name and its distribution."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def parse(cls, name: str, spec: dict[str, Any]) -> Param:
        """The parameter `name: spec` of a search file.

        Raises:
            VisionLoRAError: an unknown type or key, low > high, a log range that is not positive, an empty choice
                list.
        """
        where = f"search space: {name}"
        kind = spec.get("type")
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if kind not in _TYPES:
            raise VisionLoRAError(f"{where}: type must be one of {', '.join(_TYPES)}; got {kind!r}.")
        if unknown:
            raise VisionLoRAError(f"{where}: unknown key(s) {', '.join(unknown)}; a {kind} takes {_keys_of(kind)}.")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise VisionLoRAError(f"{where}: choices must be a non-empty list; got {choices!r}.")
            bad = [c for c in choices if not isinstance(c, _CHOICE_TYPES)]
            if bad:
                raise VisionLoRAError(f"{where}: choices must be strings, numbers, booleans or null; got {bad[0]!r}.")
            if set(spec) - {"type", "choices"}:
                raise VisionLoRAError(f"{where}: a categorical takes only choices.")
            return cls(name, kind, choices=tuple(choices))
        low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
        number = int if kind == "int" else (int, float)
        for key, value in (("low", low), ("high", high), ("step", step)):
            if (value is not None or key != "step") and (isinstance(value, bool) or not isinstance(value, number)):
                raise VisionLoRAError(
                    f"{where}: {key} must be {'an integer' if kind == 'int' else 'a number'}; got {value!r}."
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise VisionLoRAError(f"{where}: {key} must be finite; got {value!r}.")
        if low > high:
            raise VisionLoRAError(f"{where}: low ({low}) is greater than high ({high}).")
        if step is not None and step <= 0:
            raise VisionLoRAError(f"{where}: step must be positive; got {step}.")
        if log and step is not None and not (kind == "int" and step == 1):
            raise VisionLoRAError(f"{where}: log and step exclude each other; drop one.")
        if log and low <= 0:
            raise VisionLoRAError(f"{where}: a log range needs low > 0; got {low}.")
        return cls(name, kind, low=low, high=high, step=step, log=log)

    def suggest(self, trial: Any) -> Any:
        """The value of this parameter in `trial` (an `optuna.Trial`)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def _keys_of(kind: str) -> str:
    return "choices" if kind == "categorical" else "low, high, step, log"


def load_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file `path`.

    Raises:
        VisionLoRAError: the file is missing, is not YAML, or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise VisionLoRAError(f"{what} {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise VisionLoRAError(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict) or not data:
        raise VisionLoRAError(f"{what} {path} must be a non-empty mapping of options; got {type(data).__name__}.")
    return data


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters and the options fixed for every trial, by dotted `fit` option."""

    params: tuple[Param, ...]
    fixed: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        """The space of a search file's mapping: a value that is a mapping of {type, low, high, step, log, choices}
        keys is searched, any other value is fixed.

        Raises:
            VisionLoRAError: a key is not a dotted option (`model.lr`), a parameter is malformed, or nothing is
                searched.
        """
        params, fixed = [], {}
        for name, value in data.items():
            if not isinstance(name, str) or "." not in name.strip(".") or " " in name:
                raise VisionLoRAError(f"search space: {name!r} is not a dotted option of fit, like model.lr.")
            if isinstance(value, dict) and value and set(value) <= _SPEC_KEYS:
                params.append(Param.parse(name, value))
            else:
                fixed[name] = value
        if not params:
            raise VisionLoRAError("search space: no option is searched; give one as {type: float|int|categorical}.")
        return cls(tuple(params), fixed)

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """The space of the search file `path` (see `from_dict`)."""
        return cls.from_dict(load_yaml(path, "search space"))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able description, stored in the study to refuse resuming it with another space."""
        params = {
            p.name: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items() if k != "name"}
            for p in self.params
        }
        return {"params": params, "fixed": self.fixed}

    def check_names(self, options: set[str]) -> None:
        """Refuse an option that `fit` does not have (`options`: every dotted option of fit's parser).

        Raises:
            VisionLoRAError: the first unknown option, with the closest known ones.
        """
        for name in [p.name for p in self.params] + list(self.fixed):
            if name not in options:
                import difflib

                close = difflib.get_close_matches(name, sorted(options), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see vision-lora fit --help."
                raise VisionLoRAError(f"search space: fit has no option {name}{hint}")


def apply_options(config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A copy of the `fit` config `config` with each dotted option of `options` set; a class given as
    {class_path, init_args} takes its options in init_args."""
    config = copy.deepcopy(config)
    for name, value in options.items():
        node = config
        *parents, last = name.split(".")
        for key in parents:
            if key not in node and isinstance(node.get("init_args"), dict):
                node = node["init_args"]
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if last not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        node[last] = value
    return config


def _dotted(tree: dict[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        names.add(name)
        if isinstance(value, dict):
            names |= _dotted(value, f"{name}.")
            if isinstance(value.get("init_args"), dict):  # --trainer.logger.save_dir as well as .init_args.save_dir
                names |= _dotted(value["init_args"], f"{name}.")
    return names


def fit_options(config: str | Path) -> set[str]:
    """Every dotted option of `vision-lora fit --config config`, read from its `--print_config`.

    Raises:
        VisionLoRAError: `config` is not a config that fit accepts.
    """
    path = Path(config)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    return set(_fit_options(str(path.absolute()), stamp))


@functools.lru_cache(maxsize=8)
def _fit_options(config: str, stamp: int | None) -> frozenset[str]:
    from ..trainer_cli import run_trainer_command

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_trainer_command(["fit", "--config", str(config), "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
        except ValueError as error:  # VisionLoRAError and jsonargparse's own
            code, err = 1, io.StringIO(str(error))
    if code not in (0, None):
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise VisionLoRAError(f"{config} is not a config vision-lora fit accepts: {lines[-1] if lines else code}")
    return frozenset(_dotted(yaml.safe_load(out.getvalue()) or {}))
