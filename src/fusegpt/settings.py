"""The shared config base: declared settings, presets that fill only what is unset, one ``resolve()``.

Every setting is declared once, with its type, bounds or choices and a line of help
(:func:`setting`); :meth:`Settings.validate` checks all of them with one function
(:meth:`Spec.check`), and ``fusegpt prune --method M --set help`` lists them
(:func:`describe_settings`). Subclasses only add checks *across* fields (:meth:`Settings.check_across`).

Every setting defaults to ``None`` = unset. :meth:`Settings.resolve` fills each unset field from
the chosen preset (``paper`` or ``cpu``; no preset = ``paper`` on CUDA, ``cpu`` elsewhere), then
from the class's ``DEFAULTS``, validates the whole config, and records where every value came
from (``explicit``, ``preset paper``/``preset cpu``, ``default``). An explicit value always wins,
whatever it equals. Single values are checked at construction (bad input fails at once); checks
across fields run again on the resolved config.

A config is the whole recipe of a run: :meth:`Settings.to_dict` (resolved values and their
origins) is what the report stores, and :meth:`Settings.from_dict` reads it back as the config
that made it (the explicit values and the preset; what presets and defaults filled is filled again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["PRESETS", "CalibrationConfig", "ConfigError", "EvalConfig", "PruneConfig", "Settings", "Spec",
           "blocks_to_remove", "check", "describe_settings", "setting"]

PRESETS = ("paper", "cpu")
_PRESET_NAMES = PRESETS  # the class attribute PRESETS (a dict) shadows the name inside the classes
KINDS = ("int", "float", "bool", "choice", "str")


def check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


def default_preset(device_type: str) -> str:
    """The preset a run gets when none is named: ``paper`` on CUDA, ``cpu`` otherwise."""
    return "paper" if device_type == "cuda" else "cpu"


@dataclass(frozen=True)
class Spec:
    """What one setting accepts, declared once: its kind, bounds or choices, and its help line.

    ``kind``: ``int``, ``float``, ``bool``, ``choice`` (one of ``choices``) or ``str``. Bounds are
    inclusive unless ``open_low`` / ``open_high``. ``hint``: appended to the error message.
    """

    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"unknown setting kind {self.kind!r}; one of {KINDS}")
        if self.kind == "choice" and not self.choices:
            raise TypeError("a choice setting needs its choices")

    def bounds(self) -> str:
        """The accepted values in words: ``an integer >= 1``, ``a number in (0, 1)``, ``one of a, b``."""
        if self.kind == "bool":
            return "True or False"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "str":
            return "text"
        noun = "an integer" if self.kind == "int" else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if self.open_low else '['}{lo:g}, {hi:g}{')' if self.open_high else ']'}"
        if lo is not None:
            return f"{noun} {'>' if self.open_low else '>='} {lo:g}"
        if hi is not None:
            return f"{noun} {'<' if self.open_high else '<='} {hi:g}"
        return noun

    def ok(self, v: Any) -> bool:
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return isinstance(v, str) and v in self.choices
        if self.kind == "str":
            return isinstance(v, str) and bool(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and not isinstance(v, int):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo, hi = self.low, self.high
        if lo is not None and (v <= lo if self.open_low else v < lo):
            return False
        return not (hi is not None and (v >= hi if self.open_high else v > hi))

    def check(self, name: str, v: Any) -> None:
        """Raise :class:`ConfigError` naming ``name``, what it accepts and what it got (None = unset passes)."""
        if v is None or self.ok(v):
            return
        if self.kind == "choice":
            raise ConfigError(f"unknown {name} {v!r}; choose from {', '.join(self.choices)}")
        raise ConfigError(f"{name} must be {self.bounds()}, got {v!r}" + (f"; {self.hint}" if self.hint else ""))


def setting(kind: str, help: str, *, low: float | None = None, high: float | None = None,  # noqa: A002
            open_low: bool = False, open_high: bool = False, choices: tuple[str, ...] = (), hint: str = "") -> Any:
    """A dataclass field for a setting: unset (``None``) by default, with its :class:`Spec` declared once."""
    return field(default=None, metadata={"spec": Spec(kind, help, low, high, open_low, open_high, tuple(choices),
                                                      hint)})


def spec_of(f) -> Spec | None:
    return f.metadata.get("spec") if f.metadata else None


@dataclass(frozen=True)
class CalibrationConfig:
    """Seeded calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from ``source``."""

    source: str
    nsamples: int
    seqlen: int
    seed: int


@dataclass
class Settings:
    """Declared settings with presets: unset = None, one :meth:`resolve`, an origin for every value.

    Subclasses declare their fields with :func:`setting`, their ``DEFAULTS`` and ``PRESETS``, and
    checks across fields in :meth:`check_across` (which runs on set values at construction and on
    the resolved config).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": {}}
    label: ClassVar[str] = "settings"
    FORMAT: ClassVar[int] = 1  # version of to_dict's layout (from_dict reads this one and older)

    preset: str | None = setting("choice", "which preset fills the unset settings (default: paper on CUDA, cpu "
                                 "otherwise)", choices=_PRESET_NAMES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every set value against its declared :class:`Spec`, then :meth:`check_across`."""
        for f in fields(self):
            spec = spec_of(f)
            if spec is not None:
                spec.check(f.name, getattr(self, f.name))
        self.check_across()

    def check_across(self) -> None:
        """Checks across fields; use :meth:`effective` so unset values a preset will fill are skipped."""

    def sources(self) -> list[str]:
        """Every data source these settings read (checked before any model work)."""
        return []

    def windows(self) -> list[tuple[str, int, str]]:
        """``(source, tokens needed, what)`` for each set of training-split windows drawn, so their
        length is checked against the text before the model is loaded."""
        return []

    def plan_placement(self, offload: bool, device_type: str) -> None:
        """Check against where the work runs (layer-wise ``offload``, the device type) before anything
        is loaded; raises ConfigError. Default: runs anywhere."""

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

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        """Every declared setting's :class:`Spec`, by name."""
        return {f.name: s for f in fields(cls) if (s := spec_of(f)) is not None}

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
        """Checks on the resolved values (the declared specs and :meth:`check_across` again)."""
        self.validate()

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
        return replace(self.explicit_only(), **{k: v for k, v in kw.items() if v is not None})

    def explicit_only(self):
        """The unresolved config of the explicit values (and preset) only: what a user asked for."""
        if not self.is_resolved:
            return self
        base = {k: (getattr(self, k) if o == "explicit" else None) for k, o in self.origins.items()}
        return replace(self, **base)

    def explicit(self) -> dict[str, Any]:
        """The values set explicitly (the preset too, when it was named)."""
        if self.is_resolved:
            return {k: getattr(self, k) for k, o in self.origins.items() if o == "explicit"}
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Settings as JSON-ready values; for a resolved config also ``origins``."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.is_resolved:
            d["origins"] = self.origins
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config a :meth:`to_dict` record came from: its explicit values and named preset
        (unresolved; resolving it fills the rest from today's presets and defaults).

        A record without ``origins`` counts every value as explicit. Unknown keys are an error
        naming them (a record of another method, or of a newer fusegpt).
        """
        if int(d.get("format", 1)) > cls.FORMAT:
            raise ConfigError(f"settings record format {d.get('format')} is newer than this fusegpt reads "
                              f"({cls.FORMAT}); upgrade fusegpt")
        names = set(cls.setting_names())
        origins = d.get("origins")
        values = {k: v for k, v in d.items() if k in names}
        if origins is not None:
            values = {k: v for k, v in values.items() if origins.get(k) == "explicit"}
        unknown = sorted(set(d) - names - {"origins", "method", "calib", "format"})
        check(not unknown, f"{cls.label}: unknown setting(s) {', '.join(unknown)} in the record; it was made by "
                           "another method or a newer fusegpt")
        if isinstance(values.get("sparsity"), int):
            values["sparsity"] = float(values["sparsity"])
        return cls(**values)


def describe_settings(cls: type[Settings]) -> str:
    """Every setting of ``cls`` with what it accepts, its preset and default values, and its help."""
    defaults = cls.defaults()
    lines = []
    for name, spec in cls.specs().items():
        filled = [f"{p}={cls.PRESETS[p][name]!r}" for p in cls.PRESETS if name in cls.PRESETS[p]]
        if not filled and name in defaults:
            filled = [f"default={defaults[name]!r}"]
        lines.append(f"  {name:<18} {spec.bounds()}" + (f"  [{', '.join(filled)}]" if filled else ""))
        lines.append(f"  {'':<18} {spec.help}")
    return "\n".join(lines)


@dataclass
class PruneConfig(Settings):
    """Settings every pruning method shares; subclasses add theirs, their ``DEFAULTS`` and ``PRESETS``."""

    method: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {"sparsity": 0.25, "calib_source": "wiki", "seed": 0, "nsamples": 32,
                                          "seqlen": 2048}

    sparsity: float | None = setting("float", "fraction removed: of blocks (depth methods) or of decoder-block "
                                     "parameters (width methods)", low=0.0, high=1.0, open_low=True, open_high=True,
                                     hint="e.g. --sparsity 0.25 removes a quarter")
    calib_source: str | None = setting("str", "calibration text: wiki, news, wikitext2, c4, ptb or a .txt/.jsonl file")
    nsamples: int | None = setting("int", "calibration windows", low=1)
    seqlen: int | None = setting("int", "tokens per calibration window", low=2)
    seed: int | None = setting("int", "seed of the calibration windows and of every training", low=0)

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.method

    @property
    def calib(self) -> CalibrationConfig:
        """The calibration windows of a resolved config."""
        self.require_resolved()
        return CalibrationConfig(self.calib_source, self.nsamples, self.seqlen, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Settings as JSON-ready values; for a resolved config also ``calib`` and ``origins``."""
        d: dict[str, Any] = {"method": self.method, "format": self.FORMAT, **super().to_dict()}
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

    def plan_model(self, geometry: Any) -> None:
        """Check this step against the model's shapes (a ``fusegpt.memory.ModelGeometry``: ``hidden``,
        ``heads``, ``ffn``, ...) before any weights are read; raises ConfigError. Default: no check."""

    def sources(self) -> list[str]:
        return [v for k in ("calib_source", "ft_source") if (v := getattr(self, k, None))]

    def window_lengths(self) -> list[tuple[str, int]]:
        """Every window length this step uses, by setting name (checked against the model's context)."""
        return [(k, v) for k in ("seqlen", "ft_seqlen", "fold_seqlen") if (v := getattr(self, k, None))]

    def windows(self) -> list[tuple[str, int, str]]:
        return [(self.calib_source, self.nsamples * self.seqlen, "nsamples × seqlen")]


def blocks_to_remove(n_layers: int, sparsity: float) -> int:
    """k = ceil(L · s), as both papers round (ALGORITHMS.md §1)."""
    return math.ceil(n_layers * sparsity - 1e-9)


@dataclass
class EvalConfig:
    """Perplexity evaluation (GPTQ protocol) on one or more sources; with ``fidelity`` also the model's
    fidelity to the dense teacher (KL, top-1 agreement, greedy generation match:
    :mod:`fusegpt.eval.fidelity`) on the same windows, ``prompts`` prompts of ``prompt_len`` tokens
    continued for ``gen_len`` tokens."""

    data: tuple[str, ...] = ("wiki", "news")
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1
    fidelity: bool = False
    prompts: int = 16
    prompt_len: int = 32
    gen_len: int = 32

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        check(len(self.data) > 0, "give at least one evaluation data source")
        check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")
        check(self.max_tokens is None or self.max_tokens >= self.seqlen,
              f"max_tokens ({self.max_tokens}) must be at least seqlen ({self.seqlen})")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.prompts >= 0 and self.prompt_len >= 1 and self.gen_len >= 1,
              "fidelity needs prompts >= 0, prompt_len >= 1 and gen_len >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = {"data": list(self.data), "seqlen": self.seqlen, "max_tokens": self.max_tokens,
             "batch_size": self.batch_size}
        if self.fidelity:
            d.update(fidelity=True, prompts=self.prompts, prompt_len=self.prompt_len, gen_len=self.gen_len)
        return d
