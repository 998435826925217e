"""Configuration dataclasses: one per method, plus evaluation. Each validates itself.

A config is the whole recipe of a run: serialising it (``dataclasses.asdict``) is what the
report stores, and what a YAML/JSON recipe would hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class CalibrationConfig:
    """Seeded calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from ``source``."""

    source: str = "wiki"
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.nsamples >= 1, f"nsamples must be >= 1, got {self.nsamples}")
        _check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")


@dataclass
class PruneConfig:
    """Settings every pruning method shares."""

    method: ClassVar[str] = ""
    sparsity: float = 0.25
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.calib, dict):
            self.calib = CalibrationConfig(**self.calib)
        _check(
            isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity < 1.0,
            f"sparsity must be in (0, 1), got {self.sparsity}; e.g. --sparsity 0.25 removes a quarter",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def plan_layers(self, n_layers: int) -> int:
        """Check this step against a model of ``n_layers`` blocks; return the blocks left after it.

        Raises ConfigError when the budget cannot be met. Width methods leave the count as is.
        """
        return n_layers

    def with_overrides(self, **kw: Any) -> PruneConfig:
        """A copy with the given fields replaced (``None`` values are ignored); validates again."""
        names = {f.name for f in fields(self)}
        unknown = set(kw) - names - {"nsamples", "seqlen", "seed", "calib_source"}
        _check(not unknown, f"unknown setting(s) for {self.method}: {', '.join(sorted(unknown))}")
        calib_kw = {
            k2: kw.pop(k) for k, k2 in (("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed"),
                                        ("calib_source", "source")) if k in kw and kw[k] is not None
        }
        kw = {k: v for k, v in kw.items() if v is not None}
        calib = replace(self.calib, **calib_kw) if calib_kw else self.calib
        return replace(self, calib=calib, **kw)


def blocks_to_remove(n_layers: int, sparsity: float) -> int:
    """k = ceil(L · s), as both papers round (ALGORITHMS.md §1)."""
    return math.ceil(n_layers * sparsity - 1e-9)


@dataclass
class BlockPruneConfig(PruneConfig):
    """Block (depth) pruning by an importance score; subclasses name the score.

    ``early_barrier``/``latter_barrier``: how many first/last blocks are never candidates.
    """

    early_barrier: int = 0
    latter_barrier: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.early_barrier >= 0 and self.latter_barrier >= 0, "barriers must be >= 0")

    def plan_layers(self, n_layers: int) -> int:
        k = blocks_to_remove(n_layers, self.sparsity)
        n_cand = n_layers - self.early_barrier - self.latter_barrier
        _check(k < n_layers, f"sparsity {self.sparsity} removes all {n_layers} blocks; choose a smaller sparsity")
        _check(k <= n_cand, f"sparsity {self.sparsity} needs {k} blocks but only {n_cand} are candidates "
               f"(barriers {self.early_barrier}+{self.latter_barrier}); lower the sparsity or the barriers")
        return n_layers - k


@dataclass
class ShortGPTConfig(BlockPruneConfig):
    """ShortGPT: one-shot Block Influence ranking, drop the k lowest."""

    method: ClassVar[str] = "shortgpt"


@dataclass
class SLEBConfig(BlockPruneConfig):
    """SLEB: iterative, drop the block whose removal keeps calibration loss lowest.

    Barriers default to 1 as in SLEB's reference code; calibration 128 windows.
    """

    method: ClassVar[str] = "sleb"
    early_barrier: int = 1
    latter_barrier: int = 1
    calib: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(nsamples=128))


@dataclass
class MIConfig(BlockPruneConfig):
    """MI (FuseGPT's Macro Influence), iterative, drop only (the paper's "MI" ablation)."""

    method: ClassVar[str] = "mi"


@dataclass
class EvalConfig:
    """Perplexity evaluation (GPTQ protocol) on one or more sources."""

    data: tuple[str, ...] = ("wiki", "news")
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        _check(len(self.data) > 0, "give at least one evaluation data source")
        _check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")
        _check(self.max_tokens is None or self.max_tokens >= self.seqlen,
               f"max_tokens ({self.max_tokens}) must be at least seqlen ({self.seqlen})")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


# Method name -> config class; later issues register their own (FuseGPT, SlimGPT).
METHOD_CONFIGS: dict[str, type[PruneConfig]] = {
    c.method: c for c in (ShortGPTConfig, SLEBConfig, MIConfig)
}


def register_method_config(cls: type[PruneConfig]) -> type[PruneConfig]:
    """Class decorator: make ``cls`` available by its ``method`` name (CLI, recipes)."""
    METHOD_CONFIGS[cls.method] = cls
    return cls


def config_for(method: str, **settings: Any) -> PruneConfig:
    """Build the config of ``method`` from flat settings (None = default)."""
    try:
        cls = METHOD_CONFIGS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(sorted(METHOD_CONFIGS))}") from None
    return cls().with_overrides(**settings)
