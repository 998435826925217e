"""The run report: everything needed to reproduce and compare a result, as JSON.

Blocks are reported twice (USERS.md #9): ``removed`` in removal order with their *original*
indices, and ``removed_sorted``. Scores per iteration are listed against the candidates'
original indices, so iterations compare directly.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepReport:
    """One method applied to the model (a run may chain several)."""

    method: str
    config: dict[str, Any]
    removed: list[int] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float | None = None

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
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # {"before"|"after": {src: ppl}}
    eval_settings: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float | None = None
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> list[int]:
        return [i for s in self.steps for i in s.removed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        d["method"] = "+".join(s.method for s in self.steps)
        d["removed"] = self.removed
        d["removed_sorted"] = sorted(self.removed)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Report:
        d = json.loads(Path(path).read_text())
        steps = [StepReport(**{k: v for k, v in s.items() if k != "removed_sorted"}) for s in d.pop("steps", [])]
        for k in ("method", "removed", "removed_sorted"):
            d.pop(k, None)
        return cls(steps=steps, **d)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results (USERS.md #7, #10)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("fusegpt", "torch", "transformers", "datasets", "lm_eval", "gguf"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out
