"""A speed target instead of a sparsity: which sparsity (and, for a chain, which split between depth and
width) reaches a speed-up in a runtime, from that runtime's cost model (:mod:`fusegpt.speedmodel`).

* one depth method: the fewest blocks removed whose predicted speed-up meets the target;
* one width method: the smallest decoder sparsity (bisection on the planned per-layer widths, with the
  method's schedule, alignment and layout) that meets it;
* a depth method followed by a width method (``mi+slimgpt``): ``candidates`` splits from depth-heavy to
  width-heavy, each the smallest width sparsity that meets the target after that many blocks; the run
  prunes every candidate and keeps the one with the lowest calibration loss (:func:`fusegpt.prune`).

Fewer parameters removed never predicts a faster model here, and more pruning never lowers the loss,
so for one method the smallest sparsity that meets the target is also the best; a chain has no such
order, which is why its splits are measured.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..settings import PruneConfig
from ..speedmodel import TESTS, CostModel, Shape
from . import registry

TARGET_TESTS = ("both", "pp", "tg")


@dataclass(frozen=True)
class SpeedTarget:
    """``speedup`` in ``runtime`` (``llamacpp`` at GGUF type ``dtype``, or ``torch``), on ``test``: ``pp``
    (prompt), ``tg`` (generation) or ``both`` (the smaller of the two must meet it)."""

    speedup: float
    runtime: str = "llamacpp"
    dtype: str = "f16"
    test: str = "both"
    threads: int = 1
    candidates: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.speedup, (int, float)) and self.speedup > 1.0):
            raise ConfigError(f"--target-speedup must be a number > 1 (1.3 = 30% faster than dense), got "
                              f"{self.speedup!r}")
        if self.test not in TARGET_TESTS:
            raise ConfigError(f"unknown speed test {self.test!r}; choose from {', '.join(TARGET_TESTS)}")
        if self.candidates < 1:
            raise ConfigError("the number of chain candidates must be >= 1")

    def score(self, predicted: dict[str, float]) -> float:
        return min(predicted.values()) if self.test == "both" else predicted[self.test]


@dataclass
class Candidate:
    sparsities: list[float]
    predicted: dict[str, float]
    blocks_left: int
    calib_loss: float | None = None


@dataclass
class SpeedPlan:
    """The chosen sparsities (one per step), every candidate, and the cost model they came from."""

    target: SpeedTarget
    cost_model: CostModel
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def chosen(self) -> Candidate:
        measured = [c for c in self.candidates if c.calib_loss is not None]
        return min(measured, key=lambda c: c.calib_loss) if measured else self.candidates[0]

    def describe(self) -> str:
        t = self.target
        lines = [f"speed target: {t.speedup:g}x on {t.test} in {t.runtime}"
                 + (f" ({t.dtype})" if t.runtime == "llamacpp" else ""), self.cost_model.describe()]
        for c in self.candidates:
            pred = ", ".join(f"{k} {v:.2f}x" for k, v in c.predicted.items())
            loss = f", calibration loss {c.calib_loss:.4f}" if c.calib_loss is not None else ""
            lines.append(f"  sparsities {', '.join(f'{s:.4f}' for s in c.sparsities)}: {c.blocks_left} blocks, "
                         f"predicted {pred}{loss}")
        if len(self.candidates) > 1:
            lines.append("  the chain's split is chosen after loading: each candidate is pruned, the lowest "
                         "calibration loss wins")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.__dict__, "cost_model": {k: v for k, v in self.cost_model.to_dict().items()
                                                               if k != "samples"},
                "candidates": [c.__dict__ for c in self.candidates],
                "chosen": self.chosen.sparsities}


def _shape_after(meta_adapter, configs: list[PruneConfig], dense: Shape, start_params: int) -> Shape:
    """The shape a resolved chain leaves (blocks of a dense model are alike, so which go does not matter)."""
    from ..width import plan_widths

    shape = dense
    a = meta_adapter
    n = dense.blocks
    for cfg in configs:
        if registry.method_of(cfg).kind == "depth":
            n = cfg.plan_layers(n)
            shape = shape.with_blocks(n)
            a.keep_layers(list(range(n)))
        else:
            plan = plan_widths(a, cfg, start_params=start_params)
            shape = Shape(tuple(p.heads[1] for p in plan.layers), tuple(p.kv_heads[1] for p in plan.layers),
                          tuple(p.ffn[1] for p in plan.layers), dense.hidden, dense.head_dim, dense.vocab)
    return shape


def plan_speed(model_config, configs: list[PruneConfig], target: SpeedTarget, cost_model: CostModel,
               device_type: str = "cpu") -> SpeedPlan:
    """The sparsities that meet ``target`` for the chain ``configs`` (their own sparsity is ignored)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import get_adapter

    kinds = [registry.method_of(c).kind for c in configs]
    if kinds not in (["depth"], ["width"], ["depth", "width"]):
        raise ConfigError(f"--target-speedup takes one method, or a depth method followed by a width one; "
                          f"got {'+'.join(c.method for c in configs)} ({'+'.join(kinds)})")

    def meta():
        with torch.device("meta"):
            return get_adapter(AutoModelForCausalLM.from_config(copy.deepcopy(model_config)))

    base = meta()
    dense = Shape.of(base)
    start = sum(p.numel() for p in base.layers.parameters())

    def predict(sparsities: list[float]) -> tuple[dict[str, float], Shape]:
        resolved = [c.with_overrides(sparsity=s).resolve(device_type) for c, s in zip(configs, sparsities, strict=True)]
        shape = _shape_after(meta(), resolved, dense, start)
        return cost_model.speedup(dense, shape), shape

    plan = SpeedPlan(target, cost_model)
    L = dense.blocks
    if kinds == ["depth"]:
        for k in range(1, L):
            pred, shape = predict([k / L])
            if target.score(pred) >= target.speedup:
                plan.candidates.append(Candidate([k / L], pred, shape.blocks))
                return plan
        raise ConfigError(_unreachable(target, "removing all but one block"))
    if kinds == ["width"]:
        s = _smallest_width(lambda s: predict([s]), target)
        pred, shape = predict([s])
        plan.candidates.append(Candidate([s], pred, shape.blocks))
        return plan
    # depth, then width: splits from depth-heavy (the depth step alone nearly reaches it) to width-heavy
    k_alone = next((k for k in range(1, L) if target.score(cost_model.speedup(dense, dense.with_blocks(L - k)))
                    >= target.speedup), L - 1)
    ks = sorted({max(1, round(k_alone * f)) for f in _fractions(target.candidates)})
    for k in ks:
        try:
            s = _smallest_width(lambda s, k=k: predict([k / L, s]), target, low=k / L)
        except ConfigError:
            continue
        pred, shape = predict([k / L, s])
        plan.candidates.append(Candidate([k / L, s], pred, shape.blocks))
    if not plan.candidates:
        raise ConfigError(_unreachable(target, "any split between depth and width"))
    return plan


def _fractions(n: int) -> list[float]:
    return [1.0] if n == 1 else [1.0 - 0.75 * i / (n - 1) for i in range(n)]


def _smallest_width(predict, target: SpeedTarget, low: float = 0.0) -> float:
    """Bisection on the (total) width sparsity in (low, 0.9] for the smallest one that meets the target."""
    def ok(s: float) -> bool:
        try:
            return target.score(predict(s)[0]) >= target.speedup
        except ConfigError:  # not reachable at that sparsity (GQA, max_layer_ratio)
            return False

    lo, hi = low + 1e-4, 0.9
    while hi > lo:  # the largest sparsity the method can plan at all (GQA rule, max_layer_ratio)
        try:
            predict(hi)
            break
        except ConfigError:
            hi = round(hi - 0.05, 4)
    if hi <= lo or not ok(hi):
        raise ConfigError(_unreachable(target, f"the largest width sparsity it can plan ({max(hi, lo):.2f})"))
    for _ in range(30):
        if hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return math.ceil(hi * 1e4) / 1e4


def _unreachable(target: SpeedTarget, what: str) -> str:
    return (f"a {target.speedup:g}x speed-up on {target.test} in {target.runtime} is not predicted even for {what}; "
            "lower --target-speedup, or choose a method that removes more (depth)")


__all__ = ["TARGET_TESTS", "TESTS", "Candidate", "SpeedPlan", "SpeedTarget", "plan_speed"]
