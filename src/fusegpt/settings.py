"""The shared config base: typed settings, presets that fill only what is unset, one ``resolve()``.

Every setting of a method config defaults to ``None`` = unset. :meth:`PruneConfig.resolve` fills
each unset field from the chosen preset (``paper`` or ``cpu``; no preset = ``paper`` on CUDA,
``cpu`` elsewhere), then from the class's ``DEFAULTS``, validates the whole config, and records
where every value came from (``explicit``, ``preset paper``/``preset cpu``, ``default``). An
explicit value always wins, whatever it equals. Validation of single values runs at
construction (bad input fails at once); checks across fields run on the resolved config.

A config is the whole recipe of a run: :meth:`PruneConfig.to_dict` (resolved values and their
origins) is what the report stores, and what a YAML/JSON recipe would hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

PRESETS = ("paper", "cpu")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the fix."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def default_preset(device_type: str) -> str:
    """The preset a run gets when none is named: ``paper`` on CUDA, ``cpu`` otherwise."""
    return "paper" if device_type == "cuda" else "cpu"


def check_int(name: str, v: Any, low: int = 1) -> None:
    check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= low),
          f"{name} must be an integer >= {low}, got {v!r}")


def check_float(name: str, v: Any, low: float = 0.0, high: float | None = None, open_low: bool = False) -> None:
    if v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if open_low else v >= low)
    ok = ok and (high is None or v <= high)
    bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    check(ok, f"{name} must be a number {bound}, got {v!r}")


def check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    check(v is None or v in choices, f"unknown {name} {v!r}; choose from {', '.join(choices)}")


def check_bool(name: str, v: Any) -> None:
    check(v is None or isinstance(v, bool), f"{name} must be True or False, got {v!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Seeded calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from ``source``."""

    source: str
    nsamples: int
    seqlen: int
    seed: int


@dataclass
class Settings:
    """Typed settings with presets: unset = None, one :meth:`resolve`, an origin for every value.

    Subclasses declare their fields (default ``None``), ``DEFAULTS`` and ``PRESETS``, and check
    values in :meth:`validate` (set values only) and :meth:`validate_resolved` (across fields).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": {}}
    label: ClassVar[str] = "settings"

    preset: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every set value (unset ones are skipped); cross-field checks need both values."""
        check_choice("preset", self.preset, tuple(self.PRESETS))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``DEFAULTS`` merged along the class hierarchy (subclasses win)."""
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            out.update(getattr(klass, "DEFAULTS", {}) if "DEFAULTS" in vars(klass) else {})
        return out

    def effective(self, name: str) -> Any:
        """The value ``name`` will resolve to when no preset sets it (its own, else the default);
        None while a preset may still decide. Lets construction catch cross-field errors early."""
        v = getattr(self, name)
        if v is not None:
            return v
        if any(name in p for p in self.PRESETS.values()):
            return None
        return self.defaults().get(name)

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def is_resolved(self) -> bool:
        return bool(self.__dict__.get("_origins"))

    @property
    def origins(self) -> dict[str, str]:
        """Where each resolved value came from: ``explicit``, ``preset <name>`` or ``default``."""
        return dict(self.__dict__.get("_origins") or {})

    def resolve(self, device_type: str = "cpu"):
        """A copy with every unset field filled (preset, then defaults), validated as a whole.

        Idempotent: a resolved config is returned as is.
        """
        if self.is_resolved:
            return self
        name = self.preset or default_preset(device_type)
        preset = self.PRESETS[name]
        defaults = self.defaults()
        values: dict[str, Any] = {"preset": name}
        origins = {"preset": "explicit" if self.preset else f"default for {device_type}"}
        for f in fields(self):
            if f.name == "preset":
                continue
            v = getattr(self, f.name)
            if v is not None:
                origins[f.name] = "explicit"
            elif f.name in preset:
                v, origins[f.name] = preset[f.name], f"preset {name}"
            elif f.name in defaults:
                v, origins[f.name] = defaults[f.name], "default"
            else:
                origins[f.name] = "default"
            values[f.name] = v
        self.derive(values, origins)
        out = replace(self, **values)
        out.validate_resolved()
        out.__dict__["_origins"] = origins
        return out

    def derive(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        """Fill values that default to another setting (e.g. FuseGPT's ``ft_source``); a hook."""

    def validate_resolved(self) -> None:
        """Checks across fields, on the resolved values; subclasses extend."""

    def require_resolved(self) -> None:
        if not self.is_resolved:
            raise ConfigError(f"{type(self).__name__} is not resolved; call .resolve(device_type) first "
                              "(compress/prune do this)")

    def adjusted(self, why: str, **kw: Any):
        """A resolved copy with some values changed for an internal purpose (e.g. a short trial);
        their origin becomes ``why``. Validated like any config."""
        self.require_resolved()
        out = replace(self, **kw)
        out.validate_resolved()
        out.__dict__["_origins"] = {**self.origins, **{k: why for k in kw}}
        return out

    def with_overrides(self, **kw: Any):
        """A copy with the given fields replaced (``None`` values are ignored); validates again.

        The copy is unresolved: resolve it again (overrides may change what a preset fills).
        """
        unknown = set(kw) - set(self.setting_names())
        check(not unknown, f"unknown setting(s) for {self.label}: {', '.join(sorted(unknown))}; "
                           f"its settings are {', '.join(self.setting_names())}")
        if self.is_resolved:  # go back to what was explicit, so presets can fill again
            base = {k: (getattr(self, k) if o == "explicit" else None) for k, o in self.origins.items()}
            src = replace(self, **base)
        else:
            src = self
        return replace(src, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Settings as JSON-ready values; for a resolved config also ``origins``."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.is_resolved:
            d["origins"] = self.origins
        return d


@dataclass
class PruneConfig(Settings):
    """Settings every pruning method shares; subclasses add theirs, their ``DEFAULTS`` and ``PRESETS``.

    ``sparsity``: fraction of blocks (depth methods) or of decoder parameters (width methods).
    ``calib_source``/``nsamples``/``seqlen``/``seed``: the calibration windows.
    """

    method: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {"sparsity": 0.25, "calib_source": "wiki", "seed": 0, "nsamples": 32,
                                          "seqlen": 2048}

    sparsity: float | None = None
    calib_source: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.method

    def validate(self) -> None:
        super().validate()
        s = self.sparsity
        check(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 < s < 1.0),
              f"sparsity must be in (0, 1), got {s!r}; e.g. --sparsity 0.25 removes a quarter")
        check_int("nsamples", self.nsamples)
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        check(self.calib_source is None or isinstance(self.calib_source, str),
              f"calib_source must be a data source name or file, got {self.calib_source!r}")

    @property
    def calib(self) -> CalibrationConfig:
        """The calibration windows of a resolved config."""
        self.require_resolved()
        return CalibrationConfig(self.calib_source, self.nsamples, self.seqlen, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Settings as JSON-ready values; for a resolved config also ``calib`` and ``origins``."""
        d: dict[str, Any] = {"method": self.method, **super().to_dict()}
        if self.is_resolved:
            c = self.calib
            d["calib"] = {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}
            d["origins"] = d.pop("origins")
        return d

    def plan_layers(self, n_layers: int) -> int:
        """Check this step against a model of ``n_layers`` blocks; return the blocks left after it.

        Raises ConfigError when the budget cannot be met. Width methods leave the count as is.
        """
        return n_layers

    def plan_chain(self, n_layers_start: int, n_layers_now: int) -> None:
        """Check this step against the steps before it in a chain (``n_layers_start`` blocks at the
        start of the run, ``n_layers_now`` after the earlier steps); raises ConfigError. Default: no check."""


def blocks_to_remove(n_layers: int, sparsity: float) -> int:
    """k = ceil(L · s), as both papers round (ALGORITHMS.md §1)."""
    return math.ceil(n_layers * sparsity - 1e-9)


@dataclass
class EvalConfig:
    """Perplexity evaluation (GPTQ protocol) on one or more sources."""

    data: tuple[str, ...] = ("wiki", "news")
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        check(len(self.data) > 0, "give at least one evaluation data source")
        check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")
        check(self.max_tokens is None or self.max_tokens >= self.seqlen,
              f"max_tokens ({self.max_tokens}) must be at least seqlen ({self.seqlen})")
        check(self.batch_size >= 1, "batch_size must be >= 1")
