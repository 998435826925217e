"""Width plans: per-layer head counts and FFN widths that meet a parameter budget (ALGORITHMS.md §3).

**Alignment** (``align``, SlimGPT / LLM-Pruner / magnitude): every layer's kept FFN width is a
multiple of ``align`` (or the unpruned width), and its kept query heads × head_dim too (or all heads),
so the projections' row lengths fit llama.cpp's quantisation blocks (32 for q8_0 / q4_0, 256 for the
k-quants) and the kernels' tiles. For a layer whose FFN holds fewer than 8 multiples of ``align``,
it is halved until it does (:func:`effective_align`), so small models stay prunable. Which channels and heads go is still the method's choice; only
how many is rounded. **Layout** ``uniform``: every layer gets the same widths (the schedule is
``uniform`` and no block is kept whole), so the result is a stock checkpoint of its architecture.

**Budget.** ``sparsity`` is a fraction of the decoder-block parameters at the start of the run
(see :class:`~fusegpt.methods.slimgpt.SlimGPTConfig`). Each layer gets a ratio r_l from the
schedule; it keeps the head count (allowed by the GQA rule, :mod:`fusegpt.width.geometry`)
nearest to ``n_heads·(1 − r_l)`` and the FFN channels absorb the rest, so that layer loses r_l
of its parameters; r_max is solved by bisection on these discrete widths so the total meets the
target (to within one FFN channel per layer). A budget the rule cannot meet is rejected before
any calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..models import DecoderAdapter
from ..settings import ConfigError
from .geometry import BlockWidth, block_width, decoder_params, head_options, resolve_head_rule

WIDTH_SCHEDULES = ("log_increase", "uniform", "linear_increase", "log_decrease", "linear_decrease")

# ---------------------------------------------------------------------------- schedules
def schedule_shape(name: str, n_layers: int) -> list[float]:
    """The schedule's shape f(l) in [0, 1] for l = 0 … L−1 (r_l = r_min + (r_max − r_min)·f(l))."""
    L = n_layers
    if L == 1 or name == "uniform":
        return [1.0] * L
    log_inc = [math.log(1 + i) / math.log(L) for i in range(L)]
    lin_inc = [i / (L - 1) for i in range(L)]
    shapes = {
        "log_increase": log_inc,
        "linear_increase": lin_inc,
        "log_decrease": log_inc[::-1],
        "linear_decrease": lin_inc[::-1],
    }
    if name not in shapes:
        raise ConfigError(f"unknown schedule {name!r}; choose from uniform, {', '.join(shapes)}")
    return shapes[name]


@dataclass
class LayerPlan:
    """What one layer keeps: heads, K/V heads, FFN channels, and the ratio it was planned from."""

    index: int
    ratio_target: float
    heads: tuple[int, int]  # (before, after)
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    params: tuple[int, int]
    rule: str

    @property
    def ratio(self) -> float:
        return 1.0 - self.params[1] / self.params[0]


@dataclass
class WidthPlan:
    layers: list[LayerPlan]
    r_max: float
    params_start: int
    params_now: int
    params_after: int
    sparsity: float
    notes: dict = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return 1.0 - self.params_after / self.params_start


MIN_STEPS = 8  # a layer keeps at least this many width steps: align halves until its FFN holds 8 multiples


def effective_align(align: int, ffn: int) -> int:
    """``align``, halved until the FFN width holds at least :data:`MIN_STEPS` multiples of it (so a small
    model stays prunable under the preset's alignment); 1 stays 1."""
    a = max(1, align)
    while a > 1 and ffn // a < MIN_STEPS:
        a //= 2
    return a


def aligned_heads(w: BlockWidth, rule: str, align: int) -> list[tuple[int, int, int]]:
    """Head options whose ``heads × head_dim`` (the rows of o_proj's input) is a multiple of ``align``;
    keeping every head is always allowed (the unpruned width is what the kernels already run)."""
    return [o for o in head_options(w, rule) if o[0] == w.n_heads or (o[0] * w.head_dim) % align == 0]


def aligned_channels(ffn: int, kept: int, align: int) -> int:
    """The FFN width nearest to ``kept`` that is a multiple of ``align`` (at least ``align``), or the
    unpruned ``ffn`` (ties go to the wider); ``align=1`` returns ``kept``."""
    if align <= 1:
        return kept
    cands = [*range(align, ffn + 1, align), ffn]
    return min(cands, key=lambda m: (abs(m - kept), -m))


def _layer_plan(i: int, w: BlockWidth, rule: str, r: float, cap: float, align: int = 1) -> LayerPlan:
    align = effective_align(align, w.ffn)
    r = min(max(r, 0.0), cap)
    target = r * w.total
    want = w.n_heads * (1.0 - r)
    opts = [o for o in aligned_heads(w, rule, align) if o[2] <= target + 1e-6]
    heads, kv, attn_removed = min(opts, key=lambda o: (abs(o[0] - want), -o[0]))
    n_ch = int(round((target - attn_removed) / w.per_channel))
    n_ch = w.ffn - aligned_channels(w.ffn, w.ffn - min(max(n_ch, 0), w.ffn - 1), align)
    removed = attn_removed + n_ch * w.per_channel
    return LayerPlan(i, r, (w.n_heads, heads), (w.n_kv, kv), (w.ffn, w.ffn - n_ch),
                     (w.total, w.total - removed), rule)


def plan_widths(adapter: DecoderAdapter, cfg, start_params: int | None = None) -> WidthPlan:
    """Per-layer widths that meet ``cfg.sparsity``; raises ConfigError for an impossible budget.

    ``cfg``: a width-pruning config (``sparsity``, ``schedule``, ``min_ratio``,
    ``max_layer_ratio``, ``head_rule``, ``method``). ``start_params``: decoder parameters when
    the run started, which the sparsity counts against (default: the model as it is now).
    """
    widths = [block_width(adapter, b) for b in adapter.layers]
    rules = [resolve_head_rule(cfg.head_rule, w) for w in widths]
    for i, (w, rule) in enumerate(zip(widths, rules, strict=True)):
        if w.n_kv <= 0 or w.n_heads % w.n_kv:
            raise ConfigError(f"block {i}: {w.n_heads} query heads are not a multiple of {w.n_kv} K/V heads")
        if rule == "equal_per_group" and w.group == 1:
            raise ConfigError(
                f"head_rule=equal_per_group cannot prune block {i}: it has one query head per K/V head (MHA); "
                "use --set head_rule=kv_groups (or auto)"
            )
    now = decoder_params(adapter)
    cfg.require_resolved()
    start = max(int(start_params or now), now)
    need = now - (1.0 - cfg.sparsity) * start
    if need <= 0:
        raise ConfigError(
            f"the model already has {1 - now / start:.1%} fewer decoder parameters than at the start of the run, "
            f"at least {cfg.method}'s total target {cfg.sparsity:.1%}; raise its sparsity"
        )
    align = getattr(cfg, "align", 1) or 1
    uniform = getattr(cfg, "layout", "per-layer") == "uniform"
    if uniform and any(w != widths[0] for w in widths):
        raise ConfigError("layout=uniform needs blocks of equal widths to start from (this model's differ: it was "
                          "width-pruned before); use --set layout=per-layer")
    shape = schedule_shape("uniform" if uniform else cfg.schedule, len(widths))
    first, last = getattr(cfg, "keep_first", 0) or 0, getattr(cfg, "keep_last", 0) or 0
    if first or last:  # blocks kept whole (LLM-Pruner keeps the first and last few): ratio min_ratio there
        if first + last >= len(widths):
            raise ConfigError(f"keep_first={first} + keep_last={last} leave none of the {len(widths)} blocks to prune")
        shape = [0.0 if i < first or i >= len(widths) - last else f for i, f in enumerate(shape)]

    def build(r_max: float) -> list[LayerPlan]:
        return [_layer_plan(i, w, rule, cfg.min_ratio + (r_max - cfg.min_ratio) * f, cfg.max_layer_ratio, align)
                for i, (w, rule, f) in enumerate(zip(widths, rules, shape, strict=True))]

    def removed(plans: list[LayerPlan]) -> int:
        return sum(p.params[0] - p.params[1] for p in plans)

    hi = cfg.min_ratio + (cfg.max_layer_ratio - cfg.min_ratio) / max(min(f for f in shape if f > 0), 1e-9) + 1e-6
    best = removed(build(hi))
    if best < need:
        raise ConfigError(
            f"sparsity {cfg.sparsity} is not reachable by width pruning with schedule={cfg.schedule}, "
            f"max_layer_ratio={cfg.max_layer_ratio} and the {rules[0]} head rule: at most {1 - (now - best) / start:.1%} "
            f"of the decoder parameters can go (every layer keeps at least one head group and one FFN channel"
            f"{f', widths multiples of align={align}' if align > 1 else ''}); lower the sparsity, raise "
            f"max_layer_ratio, lower align or use --set schedule=uniform"
        )
    lo = cfg.min_ratio
    if removed(build(lo)) >= need:
        hi = lo
    for _ in range(60):
        if hi - lo < 1e-7:
            break
        mid = (lo + hi) / 2
        if removed(build(mid)) >= need:
            hi = mid
        else:
            lo = mid
    plans = build(hi)
    if align > 1 and not uniform:
        plans = _give_back(plans, widths, removed(plans) - need, align)
    after = now - removed(plans)
    return WidthPlan(plans, hi, start, now, after, cfg.sparsity)


def _give_back(plans: list[LayerPlan], widths: list[BlockWidth], slack: float, align: int) -> list[LayerPlan]:
    """Aligned widths move in steps of ``align`` channels, so the plan can remove more than the budget asks
    (every layer rounded the same way: 5% of the decoder at once for LLM-Pruner's uniform ratio). Hand
    single steps back, one layer at a time, the least pruned (most sensitive) layers first, round-robin,
    while the budget still holds; the overshoot left is under one layer's step."""
    plans = list(plans)
    order = sorted(range(len(plans)), key=lambda i: (plans[i].ratio_target, i))
    changed = True
    while changed:
        changed = False
        for i in order:
            p, w = plans[i], widths[i]
            a = effective_align(align, w.ffn)
            kept = p.ffn[1]
            more = w.ffn if kept + a > w.ffn else kept + a
            cost = (more - kept) * w.per_channel
            if more == kept or cost > slack:
                continue
            plans[i] = LayerPlan(p.index, p.ratio_target, p.heads, p.kv_heads, (p.ffn[0], more),
                                 (p.params[0], p.params[1] + cost), p.rule)
            slack -= cost
            changed = True
    return plans
