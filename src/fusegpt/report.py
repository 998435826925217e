"""The run report: everything needed to reproduce and compare a result, as versioned JSON.

Blocks are reported twice (USERS.md #9): ``removed`` in removal order with their *original*
indices, and ``removed_sorted``. Scores per iteration are listed against the candidates'
original indices, so iterations compare directly.

Perplexity has one naming scheme: ``perplexity[stage][source]`` with the stage one of
:data:`STAGES`: ``before`` (the model the command started from), ``after`` (after pruning) and
``healed`` (after recovery training). ``fusegpt heal`` on a pruned folder measures its input as
``after`` and its output as ``healed``.

``report.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`); :meth:`Report.load` reads
this version and every older one (version 1 had no number, and named the heal command's stages
``before_heal`` / ``after_heal``), keeps keys it does not know under ``extra.unknown`` with a
warning, and refuses a newer version with a message to upgrade.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ReportError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
STAGES = ("before", "after", "healed")
_V1_STAGES = {"before_heal": "after", "after_heal": "healed"}


def _own_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls`` (derived keys like ``removed_sorted`` drop)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class StepReport:
    """One method applied to the model (a run may chain several).

    ``resumed``: when the step continued a kept run state, ``{"after_iterations": n,
    "earlier_wall_time_s": t}``; ``wall_time_s`` then counts the earlier runs' time too.
    """

    method: str
    config: dict[str, Any]
    removed: list[int] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float | None = None
    resumed: dict[str, Any] | None = None

    @property
    def removed_sorted(self) -> list[int]:
        return sorted(self.removed)

    def add_iteration(self, scores: dict[int, float], removed: list[int], **extra: Any) -> None:
        """Record one ranking: ``scores`` keyed by original block index, blocks then removed."""
        self.iterations.append({
            "iteration": len(self.iterations),
            "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "removed": list(removed),
            **extra,
        })
        self.removed.extend(removed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed_sorted"] = self.removed_sorted
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepReport:
        return cls(**_own_fields(cls, d))


@dataclass
class HealResult:
    """What recovery training did (``fusegpt heal``, ``prune --heal``): settings with their origins, the
    training loss before/after on the healing windows and per epoch, steps, wall time, and how the
    teacher's signal was obtained when distilling."""

    settings: dict[str, Any]
    loss_before: float
    loss_after: float
    loss_per_epoch: list[float] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    loss: str = "lm"
    trained: str = "lora"
    trainable_params: int = 0
    teacher: str | None = None
    teacher_signal: str | None = None
    kd_before: float | None = None
    kd_after: float | None = None
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealResult:
        return cls(**_own_fields(cls, d))


@dataclass
class Report:
    """What ``compress`` did, and what evaluation measured; saved as ``report.json``."""

    model: str = ""
    seed: int | None = None
    steps: list[StepReport] = field(default_factory=list)
    layers_before: int = 0
    layers_after: int = 0
    params_before: int = 0
    params_after: int = 0
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # {stage: {source: ppl}}, STAGES
    fidelity: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # {stage: {source: metrics}}
    eval_settings: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float | None = None
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    heal: HealResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def removed(self) -> list[int]:
        return [i for s in self.steps for i in s.removed]

    @property
    def method(self) -> str:
        return "+".join(s.method for s in self.steps)

    @property
    def resumed(self) -> bool:
        return any(s.resumed for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        d["heal"] = self.heal.to_dict() if self.heal is not None else None
        d["method"] = self.method
        d["removed"] = self.removed
        d["removed_sorted"] = sorted(self.removed)
        d["resumed"] = self.resumed
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Any, source: str = "the report") -> Report:
        """A report from its JSON record, of this schema version or an older one."""
        if not isinstance(d, dict) or not isinstance(d.get("steps", []), list) or \
                not ({"steps", "model", "perplexity"} & set(d)):
            raise ReportError(f"{source} is not a fusegpt report (no steps, model or perplexity); give the "
                              "report.json of a fusegpt run")
        d = dict(d)
        version = d.pop("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ReportError(f"{source} has schema version {version!r}, newer than this fusegpt reads "
                              f"({SCHEMA_VERSION}); upgrade fusegpt")
        for k in ("method", "removed", "removed_sorted", "resumed"):
            d.pop(k, None)
        extra = dict(d.pop("extra", None) or {})
        if version < 2:  # v1: the heal record lived in extra, the heal command's stages had their own names
            if "heal" in extra and "heal" not in d:
                d["heal"] = extra.pop("heal")
            d["perplexity"] = {_V1_STAGES.get(k, k): v for k, v in (d.get("perplexity") or {}).items()}
        try:
            steps = [StepReport.from_dict(s) for s in d.pop("steps", [])]
            heal = d.pop("heal", None)
            heal = HealResult.from_dict(heal) if isinstance(heal, dict) else None
        except TypeError as e:
            raise ReportError(f"{source} has a malformed step or heal record ({e})") from None
        names = {f.name for f in fields(cls)}
        unknown = {k: d.pop(k) for k in sorted(set(d) - names)}
        if unknown:
            logger.warning("%s: keys this fusegpt does not know, kept under extra.unknown: %s", source,
                           ", ".join(unknown))
            extra["unknown"] = unknown
        return cls(steps=steps, heal=heal, extra=extra, **d)

    @classmethod
    def load(cls, path: str | Path) -> Report:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{p} is not valid JSON ({e}); was it cut off or edited by hand?") from None
        return cls.from_dict(d, str(p))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results (USERS.md #7, #10)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("fusegpt", "torch", "transformers", "datasets", "lm_eval", "gguf", "peft", "llama_cpp_python"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out
