"""Recipes: a run's chain of configs as a file, read from a run's ``report.json`` or written as YAML.

A recipe holds what a user *asked for*: per step the method, its explicit settings and the preset
that filled the rest (pinned by name, so a recipe made on a CPU re-runs with the ``cpu`` preset on a
GPU too), plus the healing settings, the evaluation protocol and the model. Re-running it resolves
the presets again, so a preset that changed between fusegpt versions shows up:
:meth:`Recipe.differences` lists every resolved value that differs from what the report recorded,
and the library versions and device that differ.

YAML / JSON layout (``fusegpt recipe RUN/report.json`` writes it)::

    fusegpt_recipe: 1
    model: meta-llama/Llama-2-7b-hf        # optional (the embedded model when absent)
    steps:
      - method: fusegpt
        sparsity: 0.25
        preset: cpu
        settings: {epochs: 2}
    heal: {preset: cpu, settings: {nsamples: 64}}    # optional
    eval: {data: [wiki, news], seqlen: 512, max_tokens: 16384}   # optional
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReportError
from ..heal import HealConfig
from ..report import Report
from ..settings import EvalConfig, PruneConfig, Settings
from . import registry

RECIPE_VERSION = 1
EMBEDDED_NAMES = ("embedded:SmolLM2-135M-Instruct", "", None)


@dataclass
class Recipe:
    """A chain of (unresolved) configs with pinned presets, and what the run around them used."""

    steps: list[PruneConfig]
    model: str | None = None
    heal: HealConfig | None = None
    eval: EvalConfig | None = None
    source: str = ""
    recorded: dict[str, Any] = field(default_factory=dict)  # resolved values, versions, device of the source run

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a ``report.json`` of a fusegpt run, or from a recipe file (YAML or JSON)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ReportError(f"recipe {p} does not exist; give a run's report.json or a recipe .yaml")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:  # json and yaml parse errors are ValueErrors
            raise ReportError(f"{p} cannot be read as a recipe ({e})") from None
        if isinstance(d, dict) and "fusegpt_recipe" in d:
            return cls.from_dict(d, str(p))
        return cls.from_report(Report.from_dict(d, str(p)), str(p))

    @classmethod
    def from_report(cls, report: Report, source: str = "") -> Recipe:
        """The recipe of a finished run: its steps' explicit settings and presets, its healing and evaluation."""
        if not report.steps:
            raise ReportError(f"{source or 'the report'} records no pruning step; nothing to re-run")
        steps = [_pinned(registry.get(s.method).config_cls, s.config) for s in report.steps]
        heal = _pinned(HealConfig, report.heal.settings) if report.heal is not None else None
        ev = report.eval_settings or {}
        eval_config = EvalConfig(data=tuple(ev["data"]), seqlen=ev["seqlen"], max_tokens=ev.get("max_tokens"),
                                 batch_size=ev.get("batch_size", 1)) if ev.get("data") else None
        recorded = {"steps": [s.config for s in report.steps], "versions": report.versions, "device": report.device,
                    "heal": report.heal.settings if report.heal is not None else None}
        return cls(steps=steps, model=None if report.model in EMBEDDED_NAMES else report.model, heal=heal,
                   eval=eval_config, source=source, recorded=recorded)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> Recipe:
        version = d.get("fusegpt_recipe")
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise ReportError(f"{source}: recipe version {version!r} is not one this fusegpt reads "
                              f"({RECIPE_VERSION}); upgrade fusegpt")
        if not isinstance(d.get("steps"), list) or not d["steps"]:
            raise ReportError(f"{source}: a recipe needs a non-empty 'steps' list")
        steps = []
        for i, st in enumerate(d["steps"]):
            if not isinstance(st, dict) or "method" not in st:
                raise ReportError(f"{source}: step {i + 1} needs a 'method'")
            cls_ = registry.get(st["method"]).config_cls
            values = {**(st.get("settings") or {}), **{k: st[k] for k in ("sparsity", "preset") if k in st}}
            steps.append(cls_.from_dict(values))
        heal = None
        if d.get("heal") is not None:
            h = d["heal"]
            heal = HealConfig.from_dict({**(h.get("settings") or {}), **({"preset": h["preset"]} if "preset" in h
                                                                           else {})})
        ev = d.get("eval")
        eval_config = EvalConfig(data=tuple(ev["data"]), seqlen=ev.get("seqlen", 2048), max_tokens=ev.get("max_tokens"),
                                 batch_size=ev.get("batch_size", 1)) if ev else None
        return cls(steps=steps, model=d.get("model"), heal=heal, eval=eval_config, source=source)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fusegpt_recipe": RECIPE_VERSION}
        if self.model:
            out["model"] = self.model
        out["steps"] = []
        for c in self.steps:
            ex = c.explicit()
            out["steps"].append({"method": c.method, "sparsity": ex.pop("sparsity", None), "preset": ex.pop("preset", None),
                                 "settings": ex})
        if self.heal is not None:
            ex = self.heal.explicit()
            out["heal"] = {"preset": ex.pop("preset", None), "settings": ex}
        if self.eval is not None:
            out["eval"] = self.eval.to_dict()
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ comparing
    def differences(self, resolved: list[PruneConfig], versions: dict[str, str], device: str,
                    heal: HealConfig | None = None) -> list[str]:
        """What a re-run resolves or runs with differently from the recorded run (empty for a recipe file)."""
        out = []
        for i, (now, then) in enumerate(zip(resolved, self.recorded.get("steps") or [], strict=False)):
            out += _value_diffs(f"step {i + 1} ({now.method})", now, then)
        if heal is not None and self.recorded.get("heal"):
            out += _value_diffs("heal", heal, self.recorded["heal"])
        then_v = self.recorded.get("versions") or {}
        out += [f"{k}: {then_v[k]} then, {versions.get(k, 'not installed')} now" for k in sorted(then_v)
                if then_v[k] != versions.get(k)]
        then_d = self.recorded.get("device")
        if then_d and then_d != device:
            out.append(f"device: {then_d} then, {device} now")
        return out


def _pinned(cls: type[Settings], record: dict[str, Any]):
    """The config of a record's explicit values, with the preset it resolved to pinned by name."""
    cfg = cls.from_dict(record)
    return cfg.with_overrides(preset=record.get("preset")) if record.get("preset") else cfg


def _value_diffs(label: str, now: Settings, then: dict[str, Any]) -> list[str]:
    skip = {"origins", "calib", "method", "format"}
    cur = {k: v for k, v in now.to_dict().items() if k not in skip}
    return [f"{label}: {k} was {then.get(k)!r}, now {v!r} ({now.origins.get(k, '')})" for k, v in cur.items()
            if k in then and then.get(k) != v]
