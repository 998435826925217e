"""One record per method, keyed by its config class; lookup by name; chain parsing.

A :class:`Method` says everything the rest of the package needs to know about a method: its
config, its runner, its memory and time estimates, whether it can resume after an interruption,
and whether a larger sparsity continues a smaller one. The CLI, the sweep, ``--dry-run``, the
memory plan and the report learn of a method from its record only; nothing outside
``fusegpt.methods`` branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..memory import EstimateEnv, ModelGeometry
from ..report import StepReport
from ..runstate import RunContext
from ..settings import ConfigError, PruneConfig

Runner = Callable[[RunContext, Any, StepReport], None]
MemoryParts = Callable[[ModelGeometry, Any, EstimateEnv], dict[str, dict[str, int]]]
TimeModel = Callable[[ModelGeometry, Any, EstimateEnv], float]


@dataclass(frozen=True)
class Method:
    """A pruning method as the rest of the package sees it.

    ``run(ctx, cfg, step)`` edits ``ctx.adapter``'s model in place with a resolved ``cfg``;
    ``estimate_memory(geometry, cfg, env)`` returns ``{step part: {what: bytes}}`` beyond the
    weights; ``estimate_time(geometry, cfg, env)`` returns seconds. ``resumable``: the runner
    keeps per-step state in ``ctx.state_dir(name)`` and continues from it when ``ctx.resume``.
    ``continues_smaller``: greedy and deterministic, so the first k₁ removals of a k₂-block run
    are the k₁-block run (the sweep continues cells). ``kind``: ``depth`` or ``width``.
    """

    name: str
    config_cls: type[PruneConfig]
    run: Runner
    estimate_memory: MemoryParts
    estimate_time: TimeModel
    summary: str
    kind: str = "depth"
    resumable: bool = False
    continues_smaller: bool = False


_BY_CONFIG: dict[type[PruneConfig], Method] = {}
_BY_NAME: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method``; its config class's ``method`` attribute must be its name."""
    if method.config_cls.method != method.name:
        raise ValueError(f"{method.config_cls.__name__}.method is {method.config_cls.method!r}, not {method.name!r}")
    if method.name in _BY_NAME and _BY_NAME[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _BY_NAME[method.name] = method
    _BY_CONFIG[method.config_cls] = method
    return method


def names() -> list[str]:
    return sorted(_BY_NAME)


def get(name: str) -> Method:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(names())}") from None


def method_of(cfg: PruneConfig) -> Method:
    """The record of ``cfg``'s class (exact class first, then its bases)."""
    for klass in type(cfg).__mro__:
        if klass in _BY_CONFIG:
            return _BY_CONFIG[klass]
    raise ConfigError(f"{type(cfg).__name__} is not a registered method config; choose from {', '.join(names())}")


def config_for(name: str, **settings: Any) -> PruneConfig:
    """The (unresolved) config of method ``name`` with the given settings (None = unset)."""
    return get(name).config_cls().with_overrides(**settings)


def parse_chain(text: str) -> list[str]:
    """Method names in a ``+`` chain, matching registered names first, longest first.

    ``mi+ft`` is the MI+FT method; ``mi+ft+slimgpt`` is MI+FT then SlimGPT; ``mi+slimgpt`` is MI
    then SlimGPT.
    """
    parts = [p.strip() for p in text.split("+")]
    if not text.strip() or any(not p for p in parts):
        raise ConfigError(f"cannot read method chain {text!r}; give names joined by '+', e.g. mi+slimgpt")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            cand = "+".join(parts[i:j])
            if cand in _BY_NAME:
                out.append(cand)
                i = j
                break
        else:
            raise ConfigError(f"unknown method {parts[i]!r} in {text!r}; choose from {', '.join(names())}")
    return out
