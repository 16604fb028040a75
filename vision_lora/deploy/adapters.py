"""Adapter folders for multi-adapter serving: what one holds, read without a model (`inspect_adapter`), whether it fits
the served backbone (`check_compatible`), and a folder of them watched for changes (`AdapterDirectory`).

Only safetensors is read (a pickle beside it is refused, never opened); a folder over the size cap is refused before
any byte of it is parsed. Names come from the folder listing and must match `NAME_PATTERN`; a name in a request is
only ever looked up among them, never joined into a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VisionLoRAError
from ..lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from ..lora.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_adapter
from ..preprocess import DATA_CONFIG_KEYS, complete_data_config

__all__ = [
    "NAME_PATTERN",
    "AdapterDirectory",
    "AdapterSpec",
    "BackboneSpec",
    "check_compatible",
    "check_name",
    "inspect_adapter",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_name(name: str) -> str:
    """`name` when it is a valid adapter name (`[A-Za-z0-9_.-]{1,64}`, not `.` or `..`).

    Raises:
        VisionLoRAError: any other name.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise VisionLoRAError(f"adapter names are 1-64 characters of A-Z a-z 0-9 _ . - (got {str(name)[:80]!r}).")
    return name


@dataclass(frozen=True)
class BackboneSpec:
    """The served backbone an adapter must have been trained on.

    Attributes:
        name: the timm architecture, e.g. "vit_small_patch16_224".
        weights: the weight source as `create_backbone` takes it ("random", "offline", "hub" or a file path).
        data_config: the complete preprocessing the backbone serves with.
    """

    name: str
    weights: str
    data_config: dict


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter folder holds, read from its config and its safetensors header.

    Attributes:
        path: the folder with symlinks resolved (never shown to clients).
        format: "vision_lora" or "peft".
        model_name: the timm architecture it was trained on (None: a PEFT config that does not name one).
        weights: the backbone weight source it records (None: PEFT files record none).
        data_config: the preprocessing it records, complete (None: PEFT files record none).
        num_classes: rows of its head.
        class_names: its labels ("0", "1", ... when it records none).
        rank: LoRA rank r of its config.
        use_dora: whether it is a DoRA adapter.
        sha256: the first 16 hex digits of the SHA-256 of its config and weights files.
        size_bytes: the bytes of all its files.
        task: "multiclass" or "multilabel" (PEFT files record none: multiclass).
        thresholds: a multi-label adapter's per-class decision thresholds on the sigmoid, chosen on its val split.
    """

    path: str
    format: str
    model_name: str | None
    weights: str | None
    data_config: dict | None
    num_classes: int
    class_names: list[str]
    rank: int
    use_dora: bool
    sha256: str
    size_bytes: int
    task: str = "multiclass"
    thresholds: list[float] | None = None


def _files(path: Path, max_bytes: int) -> int:
    """The total size of the files in `path`, after refusing pickles and folders over the cap."""
    total = 0
    for entry in os.scandir(path):
        if entry.name.lower().endswith(_PICKLE_SUFFIXES):
            raise VisionLoRAError(
                f"it holds {entry.name!r}, a pickle format, which is never read; keep only safetensors + JSON files."
            )
        if entry.is_file():
            total += entry.stat().st_size
    if total > max_bytes:
        raise VisionLoRAError(
            f"its files take {total / 1e6:.1f} MB, over the cap of {max_bytes / 1e6:g} MB (--max_adapter_mb)."
        )
    return total


def _head_rows(weights: Path, peft: bool) -> tuple[int, list[str]]:
    """(head rows, tensor names) from the safetensors header, which is checked to cover the whole file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            rows = {f.get_slice(k).get_shape()[0] for k in keys if "lora_" not in k and k.endswith(".weight")}
    except (SafetensorError, OSError) as err:
        raise VisionLoRAError(f"{weights.name} is not a complete safetensors file ({err}).") from None
    if peft and len(rows) != 1:
        raise VisionLoRAError(f"{weights.name} holds no single classifier head (modules_to_save); it cannot serve.")
    return (rows.pop() if rows else 0), keys


def inspect_adapter(path: str | os.PathLike, max_bytes: int = 64_000_000) -> AdapterSpec:
    """Read what an adapter folder holds without building a model: format, backbone, head, rank and content hash.

    Raises:
        VisionLoRAError: not an adapter folder, a pickle file in it, files over `max_bytes`, an unreadable or truncated
            file, or an adapter that changes the frozen path (biases or norm layers trained).
    """
    path = Path(os.path.realpath(path))
    if not path.is_dir():
        raise VisionLoRAError("it is not a folder.")
    size = _files(path, max_bytes)
    peft = is_peft_adapter(path)
    config_file, weights_file = (PEFT_CONFIG, PEFT_WEIGHTS) if peft else (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    if not (path / weights_file).is_file():
        raise VisionLoRAError(f"it has no {weights_file} (safetensors) beside {config_file}.")
    digest = hashlib.sha256()
    for name in (config_file, weights_file):
        digest.update((path / name).read_bytes())
    rows, _ = _head_rows(path / weights_file, peft)
    if peft:
        from ..lora.peft_format import _base_name, _read_config

        values = _read_config(path)
        lora = {"bias": values.get("bias", "none"), "train_norm": False}
        model, weights, data_config, classes = _base_name(values.get("base_model_name_or_path")), None, None, None
        rank, dora = int(values["r"]), bool(values.get("use_dora"))
        task, thresholds = "multiclass", None
    else:
        try:
            info = read_adapter_config(path)
        except FileNotFoundError as err:
            raise VisionLoRAError(str(err).replace(str(path), "the folder")) from None
        lora = info["lora_config"]
        model, weights = info["model_name"], info.get("weights")
        data_config = complete_data_config(info["data_config"]) if info.get("data_config") else None
        rows, classes = int(info["num_classes"]), info.get("class_names")
        rank, dora = int(lora["r"]), bool(lora.get("use_dora"))
        task, thresholds = info.get("task", "multiclass"), info.get("thresholds")
        if task == "multilabel" and (not isinstance(thresholds, list) or len(thresholds) != rows):
            raise VisionLoRAError(
                f"it is a multi-label adapter without {rows} per-class thresholds in its config; export it again "
                f"from its run (fit writes them)."
            )
    if lora.get("bias", "none") != "none" or lora.get("train_norm"):
        raise VisionLoRAError(
            f"it trains {'biases' if lora.get('bias', 'none') != 'none' else 'norm layers'} of the backbone, which "
            f"changes the frozen path shared by every adapter; retrain with bias='none' and train_norm=False."
        )
    return AdapterSpec(
        path=str(path),
        format="peft" if peft else "vision_lora",
        model_name=model,
        weights=weights,
        data_config=data_config,
        num_classes=rows,
        class_names=list(classes) if classes else [str(i) for i in range(rows)],
        rank=rank,
        use_dora=dora,
        sha256=digest.hexdigest()[:16],
        size_bytes=size,
        task=task,
        thresholds=[float(t) for t in thresholds] if task == "multilabel" else None,
    )


def _same_weights(recorded: str, served: str, model_name: str) -> bool:
    from ..weights import OFFLINE_WEIGHTS, _architecture

    def canonical(w: str) -> str:
        if w == "pretrained":
            return "offline" if _architecture(model_name) in OFFLINE_WEIGHTS else "hub"
        return w

    recorded, served = canonical(recorded), canonical(served)
    if recorded == served:
        return True
    both_files = os.path.isfile(recorded) and os.path.isfile(served)
    return both_files and os.path.samefile(recorded, served)


def check_compatible(spec: AdapterSpec, backbone: BackboneSpec) -> None:
    """Refuse an adapter trained on another backbone, weight source or preprocessing than the served backbone's.

    PEFT files record no weight source or preprocessing: those are taken to be the backbone's.

    Raises:
        VisionLoRAError: the first difference, and what to change.
    """
    if spec.model_name is not None and spec.model_name != backbone.name:
        raise VisionLoRAError(f"it was trained on {spec.model_name!r}, the served backbone is {backbone.name!r}.")
    if spec.weights is not None and not _same_weights(spec.weights, backbone.weights, backbone.name):
        raise VisionLoRAError(
            f"it was trained on backbone weights {os.path.basename(spec.weights)!r}, the server loaded "
            f"{os.path.basename(backbone.weights)!r}; start the server with the adapter's --weights."
        )
    if spec.data_config is not None:
        served = complete_data_config(backbone.data_config)
        diff = [k for k in DATA_CONFIG_KEYS if spec.data_config.get(k) != served.get(k)]
        if diff:
            shown = ", ".join(f"{k} {spec.data_config.get(k)} vs {served.get(k)}" for k in diff)
            raise VisionLoRAError(f"its preprocessing differs from the served backbone's ({shown}).")


@dataclass
class _Entry:
    signature: tuple
    spec: AdapterSpec | None = None
    error: str | None = None


@dataclass
class AdapterDirectory:
    """A folder whose sub-folders (or symlinks to folders) are adapters named after them, re-read on `refresh`.

    Entries starting with "." or ending with ".tmp" are skipped (versions kept in a hidden folder, a symlink being
    swapped in). An entry is re-inspected only when its resolved path or its files' sizes and times change.

    Args:
        root: the folder.
        backbone: what every adapter must fit; None checks only the files.
        max_bytes: the cap on one adapter's files.
    """

    root: str
    backbone: BackboneSpec | None = None
    max_bytes: int = 64_000_000
    entries: dict[str, _Entry] = field(default_factory=dict)

    def _signature(self, name: str) -> tuple:
        path = os.path.realpath(os.path.join(self.root, name))
        try:
            files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)))
        except OSError:
            files = ()
        return (path, files)

    def refresh(self) -> tuple[set[str], set[str], set[str]]:
        """Re-read the folder: (added, changed, removed) names since the last call."""
        try:
            names = {
                e.name
                for e in os.scandir(self.root)
                if not e.name.startswith(".") and not e.name.endswith(".tmp") and e.is_dir()
            }
        except OSError:
            names = set()
        removed = set(self.entries) - names
        for name in removed:
            del self.entries[name]
        added, changed = set(), set()
        for name in sorted(names):
            signature = self._signature(name)
            old = self.entries.get(name)
            if old is not None and old.signature == signature:
                continue
            (added if old is None else changed).add(name)
            self.entries[name] = self._inspect(name, signature)
        return added, changed, removed

    def _inspect(self, name: str, signature: tuple) -> _Entry:
        try:
            check_name(name)
            spec = inspect_adapter(signature[0], self.max_bytes)
            if self.backbone is not None:
                check_compatible(spec, self.backbone)
        except (VisionLoRAError, OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            message = str(err).replace(signature[0], name).replace(str(self.root), "<adapters>")
            return _Entry(signature, error=f"{type(err).__name__}: {message}")
        return _Entry(signature, spec=spec)

    def spec(self, name: str) -> AdapterSpec | None:
        """The spec of a loadable adapter of that name, else None (unknown or refused)."""
        entry = self.entries.get(name)
        return entry.spec if entry is not None else None
