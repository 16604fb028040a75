"""LoRAConfig, the one list of LoRA options (PEFT's names and rules), and LoRAReport, what applying it did."""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field

from ..errors import VisionLoRAError

__all__ = ["LoRAConfig", "LoRAReport", "LoRAReportRow"]

_BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoRAConfig:
    """What to adapt and how: the one list of LoRA options (`LoRAClassifier` takes them flat: `--model.r`).

    Args:
        r: rank of the update B·A.
        lora_alpha: the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`).
        lora_dropout: dropout on the input of the LoRA branch during training.
        target_modules: module-name patterns: globs on the dotted name (a bare name such as "qkv" also matches as a
            suffix), "re:<regex>" for a full-match regex, or "preset:<name>" (see `PRESETS`). None: the preset of the
            model's family ("preset:auto").
        exclude_modules: patterns, in the same syntax, removed from what `target_modules` selects.
        qkv_slices: which slices of a fused attention qkv projection are adapted, a subset of "qkv"; or "fused": one
            LoRA over the whole projection, as PEFT adapts it.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: DoRA, weight-decomposed LoRA: each adapted output row of W + s·B·A is rescaled to a learned length
            (`lora_magnitude`, starting at the row's norm in W).
        rank_pattern: per-module ranks, PEFT's rule: {key: r} where the regex key matches the end of a dotted module
            name after a "." (e.g. "blocks.0.attn.qkv" or "fc1"); the first key that matches wins.
        alpha_pattern: per-module lora_alpha, keys as in `rank_pattern`.
        bias: which biases also train: "none", "all", or "lora_only" (those of the adapted layers).
        train_norm: also train normalization layers (and let BatchNorm statistics update).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    qkv_slices: str = "qv"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    train_norm: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise VisionLoRAError(f"LoRA rank r must be >= 1, got {self.r}.")
        if self.lora_alpha <= 0:
            raise VisionLoRAError(f"lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise VisionLoRAError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        fused = self.qkv_slices == "fused"
        if not fused and (
            not self.qkv_slices
            or set(self.qkv_slices) - set("qkv")
            or len(set(self.qkv_slices)) != len(self.qkv_slices)
        ):
            raise VisionLoRAError(
                f"qkv_slices must be a non-empty subset of 'qkv' such as 'qv', or 'fused', got {self.qkv_slices!r}."
            )
        if self.bias not in _BIAS_MODES:
            raise VisionLoRAError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.exclude_modules = list(self.exclude_modules or [])
        self.rank_pattern = {str(k): int(v) for k, v in (self.rank_pattern or {}).items()}
        self.alpha_pattern = {str(k): float(v) for k, v in (self.alpha_pattern or {}).items()}
        for kind, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except re.error as err:
                    raise VisionLoRAError(f"{kind} key {key!r} is not a valid regular expression: {err}.") from None
                if value <= 0:
                    raise VisionLoRAError(f"{kind}[{key!r}] must be > 0, got {value}.")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) of module `name`: from the first matching key of `rank_pattern` / `alpha_pattern`, else
        the global values."""
        return int(_pattern_value(self.rank_pattern, name, self.r)), float(
            _pattern_value(self.alpha_pattern, name, self.lora_alpha)
        )

    def to_dict(self) -> dict:
        """Plain JSON-serialisable values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LoRAConfig:
        """The config of `values` (as `to_dict` wrote them, or flat options); unknown keys are an error.

        Raises:
            VisionLoRAError: a key is not a LoRA option, or a value is out of range.
        """
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(cls.__dataclass_fields__), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise VisionLoRAError(
                f"{unknown[0]!r} is not a LoRA option{hint} (options: {', '.join(cls.__dataclass_fields__)})."
            )
        return cls(**values)


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    """PEFT's rule for rank / alpha patterns: the value of the first regex key that matches the end of `name`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class LoRAReportRow:
    name: str
    kind: str
    in_features: int
    out_features: int
    rank: int
    params: int
    note: str = ""


@dataclass
class LoRAReport:
    """One row per adapted module plus trainable / total parameter counts of the whole model, and the modules a
    preset left out because LoRA cannot adapt them (name, reason)."""

    rows: list[LoRAReportRow]
    trainable_params: int
    total_params: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def lora_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        header = ("module", "kind", "in -> out", "rank", "params")
        lines = [
            (r.name, r.kind, f"{r.in_features} -> {r.out_features}", str(r.rank), f"{r.params:,}") for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:{'>' if i >= 3 else '<'}{w}}}" for i, w in enumerate(widths))
        table = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines]
        table += [f"note: {r.name}: {r.note}" for r in self.rows if r.note]
        table += [f"skipped: {name}: {why}" for name, why in self.skipped]
        table.append(
            f"{len(self.rows)} adapted modules, {self.lora_params:,} LoRA params; trainable {self.trainable_params:,} "
            f"/ {self.total_params:,} ({self.trainable_percent:.2f}%)"
        )
        return "\n".join(table)
