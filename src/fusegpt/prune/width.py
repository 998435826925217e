"""SlimGPT: layer-wise width pruning of attention heads and FFN channels (ALGORITHMS.md §3).

Flow, block by block on cached hidden states (block l sees the outputs of the already-pruned
blocks 0…l−1):

1. the inputs of ``o_proj`` feed an :class:`~fusegpt.prune.obs.OBSLayer` (the forward stops
   there); heads are chosen by Batched Greedy Pruning with OBS compensation of ``o_proj``, and
   the matching ``q_proj``/``k_proj``/``v_proj`` rows (and biases) are removed;
2. the block runs again with its pruned attention; the inputs of ``down_proj`` feed a second
   OBSLayer; FFN channels are chosen with Dynamic Group Size and compensated, and the matching
   ``gate_proj``/``up_proj`` rows are removed;
3. the pruned block produces the inputs of block l+1.

**GQA rule.** Query head ``h`` reads K/V head ``h // g`` (g = query heads per K/V head).
``equal_per_group`` (default for GQA) removes the same number of query heads from every K/V
group, so every group keeps g' heads and the K/V heads stay; ``kv_groups`` (the only choice for
MHA, where g = 1) removes whole groups: their query heads, their K and V rows. Either way the
pruned attention is an ordinary GQA attention with ``n_heads' = n_kv' · g'``. A budget the rule
cannot meet is rejected before any calibration.

**Budget.** ``sparsity`` is a fraction of the decoder-block parameters at the start of the run
(see :class:`~fusegpt.config.SlimGPTConfig`). Each layer gets a ratio r_l from the schedule; it
keeps the head count (allowed by the GQA rule) nearest to ``n_heads·(1 − r_l)`` and the FFN
channels absorb the rest, so that layer loses r_l of its parameters; r_max is solved by bisection
on these discrete widths so the total meets the target (to within one FFN channel per layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import calibration_for, register_method
from ..config import ConfigError, SlimGPTConfig
from ..models import DecoderAdapter
from ..report import StepReport
from .obs import OBSLayer, StopForward, magnitude_order

logger = logging.getLogger(__name__)

NEEDED_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- geometry
@dataclass
class BlockWidth:
    """Widths of one block and what one unit of each costs in parameters."""

    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    per_head: int  # q rows (+bias) and o columns of one query head
    per_kv: int  # k and v rows (+biases) of one K/V head
    per_channel: int  # gate/up rows (+biases) and the down column of one FFN channel
    total: int  # all parameters of the block

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv


def _linear_roles(adapter: DecoderAdapter, block: nn.Module) -> dict[str, nn.Linear]:
    roles = adapter.linear_roles(block)
    missing = [r for r in NEEDED_ROLES if not isinstance(roles.get(r), nn.Linear)]
    if missing:
        raise ConfigError(
            f"width pruning needs separate nn.Linear q/k/v/o and gate/up/down projections; "
            f"{type(adapter).__name__} has no plain {', '.join(missing)} (fused or unsupported layout)"
        )
    return roles


def _bias(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def block_width(adapter: DecoderAdapter, block: nn.Module) -> BlockWidth:
    r = _linear_roles(adapter, block)
    d = adapter.head_dim
    q, k, v, o = r["q_proj"], r["k_proj"], r["v_proj"], r["o_proj"]
    g, u, dn = r["gate_proj"], r["up_proj"], r["down_proj"]
    return BlockWidth(
        n_heads=q.out_features // d,
        n_kv=k.out_features // d,
        head_dim=d,
        ffn=u.out_features,
        per_head=d * (q.in_features + _bias(q)) + o.out_features * d,
        per_kv=d * (k.in_features + _bias(k)) + d * (v.in_features + _bias(v)),
        per_channel=(g.in_features + _bias(g)) + (u.in_features + _bias(u)) + dn.out_features,
        total=sum(p.numel() for p in block.parameters()),
    )


def decoder_params(adapter: DecoderAdapter) -> int:
    """Parameters of the decoder blocks (embeddings, final norm and LM head excluded)."""
    return sum(p.numel() for p in adapter.layers.parameters())


def resolve_head_rule(rule: str, w: BlockWidth) -> str:
    if rule == "auto":
        return "equal_per_group" if w.group > 1 else "kv_groups"
    return rule


def head_options(w: BlockWidth, rule: str) -> list[tuple[int, int, int]]:
    """(heads kept, K/V heads kept, parameters removed) allowed by ``rule``, most heads first."""
    if rule == "equal_per_group":
        return [(w.n_kv * m, w.n_kv, (w.n_heads - w.n_kv * m) * w.per_head) for m in range(w.group, 0, -1)]
    return [(w.group * k, k, (w.n_kv - k) * (w.group * w.per_head + w.per_kv)) for k in range(w.n_kv, 0, -1)]


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


def _layer_plan(i: int, w: BlockWidth, rule: str, r: float, cap: float) -> LayerPlan:
    r = min(max(r, 0.0), cap)
    target = r * w.total
    want = w.n_heads * (1.0 - r)
    opts = [o for o in head_options(w, rule) if o[2] <= target + 1e-6]
    heads, kv, attn_removed = min(opts, key=lambda o: (abs(o[0] - want), -o[0]))
    n_ch = int(round((target - attn_removed) / w.per_channel))
    n_ch = min(max(n_ch, 0), w.ffn - 1)
    removed = attn_removed + n_ch * w.per_channel
    return LayerPlan(i, r, (w.n_heads, heads), (w.n_kv, kv), (w.ffn, w.ffn - n_ch),
                     (w.total, w.total - removed), rule)


def plan_widths(adapter: DecoderAdapter, cfg: SlimGPTConfig) -> WidthPlan:
    """Per-layer widths that meet ``cfg.sparsity``; raises ConfigError for an impossible budget."""
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
    start_info = getattr(adapter.model, "_fusegpt_run_start", None) or {}
    start = int(start_info.get("decoder_params", now))
    start = max(start, now)
    need = now - (1.0 - cfg.sparsity) * start
    if need <= 0:
        raise ConfigError(
            f"the model already has {1 - now / start:.1%} fewer decoder parameters than at the start of the run, "
            f"at least {cfg.method}'s total target {cfg.sparsity:.1%}; raise its sparsity"
        )
    shape = schedule_shape(cfg.schedule, len(widths))

    def build(r_max: float) -> list[LayerPlan]:
        return [_layer_plan(i, w, rule, cfg.min_ratio + (r_max - cfg.min_ratio) * f, cfg.max_layer_ratio)
                for i, (w, rule, f) in enumerate(zip(widths, rules, shape, strict=True))]

    def removed(plans: list[LayerPlan]) -> int:
        return sum(p.params[0] - p.params[1] for p in plans)

    hi = cfg.min_ratio + (cfg.max_layer_ratio - cfg.min_ratio) / max(min(f for f in shape if f > 0), 1e-9) + 1e-6
    best = removed(build(hi))
    if best < need:
        raise ConfigError(
            f"sparsity {cfg.sparsity} is not reachable by width pruning with schedule={cfg.schedule}, "
            f"max_layer_ratio={cfg.max_layer_ratio} and the {rules[0]} head rule: at most {1 - (now - best) / start:.1%} "
            f"of the decoder parameters can go (every layer keeps at least one head group and one FFN channel); "
            f"lower the sparsity, raise max_layer_ratio or use --set schedule=uniform"
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
    after = now - removed(plans)
    return WidthPlan(plans, hi, start, now, after, cfg.sparsity)


# ---------------------------------------------------------------------------- structural edits
def shrink_linear(lin: nn.Linear, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding rows ``out_keep`` and columns ``in_keep`` of ``lin`` (bias rows too)."""
    W = lin.weight.data
    if out_keep is not None:
        W = W[out_keep]
    if in_keep is not None:
        W = W[:, in_keep]
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if lin.bias is not None:
        b = lin.bias.data if out_keep is None else lin.bias.data[out_keep]
        new.bias.data.copy_(b)
    new.train(lin.training)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _head_rows(heads: list[int], d: int, device) -> torch.Tensor:
    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long, device=device)


def apply_head_pruning(adapter: DecoderAdapter, block: nn.Module, keep_heads: list[int], keep_kv: list[int]) -> None:
    """Keep query heads ``keep_heads`` and K/V heads ``keep_kv`` (sorted); set the attention geometry."""
    r = _linear_roles(adapter, block)
    d = adapter.head_dim
    dev = r["q_proj"].weight.device
    q_rows = _head_rows(keep_heads, d, dev)
    kv_rows = _head_rows(keep_kv, d, dev)
    adapter.set_linear(block, "q_proj", shrink_linear(r["q_proj"], out_keep=q_rows))
    adapter.set_linear(block, "k_proj", shrink_linear(r["k_proj"], out_keep=kv_rows))
    adapter.set_linear(block, "v_proj", shrink_linear(r["v_proj"], out_keep=kv_rows))
    adapter.set_linear(block, "o_proj", shrink_linear(r["o_proj"], in_keep=q_rows))
    adapter.set_attention_geometry(block, len(keep_heads), len(keep_kv))


def apply_ffn_pruning(adapter: DecoderAdapter, block: nn.Module, keep: list[int]) -> None:
    """Keep FFN channels ``keep`` (sorted): rows of gate/up, columns of down."""
    r = _linear_roles(adapter, block)
    idx = torch.tensor(sorted(keep), dtype=torch.long, device=r["up_proj"].weight.device)
    adapter.set_linear(block, "gate_proj", shrink_linear(r["gate_proj"], out_keep=idx))
    adapter.set_linear(block, "up_proj", shrink_linear(r["up_proj"], out_keep=idx))
    adapter.set_linear(block, "down_proj", shrink_linear(r["down_proj"], in_keep=idx))


# ---------------------------------------------------------------------------- head / channel choice
def head_units(w: BlockWidth, p: LayerPlan) -> tuple[list[list[int]], list[list[int]]]:
    """(units as head lists, removal schedule as candidate unit ids) for the layer's GQA rule."""
    g = w.group
    if p.rule == "equal_per_group":
        units = [[h] for h in range(w.n_heads)]
        per_group = g - p.heads[1] // w.n_kv
        sched = [list(range(k * g, (k + 1) * g)) for _ in range(per_group) for k in range(w.n_kv)]
    else:
        units = [list(range(k * g, (k + 1) * g)) for k in range(w.n_kv)]
        sched = [list(range(w.n_kv))] * (w.n_kv - p.kv_heads[1])
    return units, sched


def _heads_kept(w: BlockWidth, p: LayerPlan, units: list[list[int]], removed: list[int]) -> tuple[list[int], list[int]]:
    gone = {h for u in removed for h in units[u]}
    keep = [h for h in range(w.n_heads) if h not in gone]
    keep_kv = sorted({h // w.group for h in keep})
    return keep, keep_kv


def _sq_rows(W: torch.Tensor) -> torch.Tensor:
    return W.float().pow(2).sum(dim=1)


def magnitude_heads(adapter: DecoderAdapter, block: nn.Module, w: BlockWidth, p: LayerPlan) -> tuple[list[int], list[int], list[int]]:
    r = _linear_roles(adapter, block)
    d = w.head_dim
    q = _sq_rows(r["q_proj"].weight).view(w.n_heads, d).sum(1)
    o = r["o_proj"].weight.float().pow(2).sum(0).view(w.n_heads, d).sum(1)
    per_head = q + o
    units, sched = head_units(w, p)
    if p.rule == "kv_groups":
        kv = (_sq_rows(r["k_proj"].weight) + _sq_rows(r["v_proj"].weight)).view(w.n_kv, d).sum(1)
        scores = torch.stack([per_head[u].sum() + kv[k] for k, u in enumerate(units)])
    else:
        scores = per_head
    removed = magnitude_order(scores, sched)
    keep, keep_kv = _heads_kept(w, p, units, removed)
    return keep, keep_kv, removed


def magnitude_channels(adapter: DecoderAdapter, block: nn.Module, n_remove: int) -> list[int]:
    r = _linear_roles(adapter, block)
    s = _sq_rows(r["gate_proj"].weight) + _sq_rows(r["up_proj"].weight) + r["down_proj"].weight.float().pow(2).sum(0)
    return torch.argsort(s)[:n_remove].tolist()


# ---------------------------------------------------------------------------- the run
def _collect(adapter: DecoderAdapter, block: nn.Module, layer: nn.Linear, name: str, percdamp: float,
             hidden: list[torch.Tensor], ctxs: list, index: int) -> OBSLayer:
    """Feed ``layer``'s inputs over all calibration batches to a new OBSLayer (forward stops there)."""
    obs = OBSLayer(layer, name=name, percdamp=percdamp)
    handle = obs.hook(stop=True)
    try:
        for h, ctx in zip(hidden, ctxs, strict=True):
            try:
                adapter.run_block(block, h, ctx, index)
            except StopForward:
                pass
    finally:
        handle.remove()
    return obs


@torch.no_grad()
def prune_widths(adapter: DecoderAdapter, calib: torch.Tensor | None, cfg: SlimGPTConfig, plan: WidthPlan,
                 step: StepReport) -> None:
    """Prune every block to ``plan`` in place (sequentially, on cached hidden states)."""
    magnitude = cfg.method == "magnitude"
    origin = adapter.origin
    hidden: list[torch.Tensor] = []
    ctxs: list = []
    if not magnitude:
        assert calib is not None
        for ids in calib.split(cfg.batch_size):
            h = adapter.embed(ids.to(adapter.device))
            hidden.append(h)
            ctxs.append(adapter.context(h))
    per_layer = []
    bar = tqdm(list(enumerate(adapter.layers)), desc=f"{cfg.method} blocks", unit="block")
    for i, block in bar:
        with adapter.using([i], write=True):
            hidden, info = _prune_block(adapter, cfg, plan, i, block, hidden, ctxs, origin[i])
        per_layer.append(info)
    bar.close()
    step.details.update({
        "sparsity_target": cfg.sparsity,
        "sparsity_basis": "decoder-block parameters at the start of the run",
        "sparsity_achieved": round(plan.achieved, 6),
        "sparsity_of_step_input": round(1 - plan.params_after / plan.params_now, 6),
        "decoder_params": {"start": plan.params_start, "before": plan.params_now, "after": plan.params_after},
        "schedule": cfg.schedule,
        "r_min": cfg.min_ratio,
        "r_max": round(plan.r_max, 6),
        "head_rule": sorted({p.rule for p in plan.layers}),
        "layers": per_layer,
    })
    logger.info("%s: decoder params %d -> %d (%.2f%% of the start), r_max %.4f", cfg.method, plan.params_now,
                plan.params_after, 100 * plan.achieved, plan.r_max)


def _prune_block(adapter: DecoderAdapter, cfg: SlimGPTConfig, plan: WidthPlan, i: int, block: nn.Module,
                 hidden: list[torch.Tensor], ctxs: list, origin: int) -> tuple[list[torch.Tensor], dict]:
    """Prune block ``i`` to its plan (OBS or magnitude); returns the hidden states after it and its report."""
    magnitude = cfg.method == "magnitude"
    p = plan.layers[i]
    w = block_width(adapter, block)
    info = {"layer": origin, "ratio_target": round(p.ratio_target, 5), "ratio": round(p.ratio, 5),
            "heads": list(p.heads), "kv_heads": list(p.kv_heads), "ffn": list(p.ffn), "params": list(p.params)}
    roles = _linear_roles(adapter, block)
    if p.heads[1] < p.heads[0]:
        if magnitude:
            keep, keep_kv, removed = magnitude_heads(adapter, block, w, p)
        else:
            obs = _collect(adapter, block, roles["o_proj"], f"block {origin} o_proj", cfg.percdamp,
                           hidden, ctxs, i)
            units, sched = head_units(w, p)
            d = w.head_dim
            col_units = [[h * d + j for h in u for j in range(d)] for u in units]
            removed, err = obs.prune_units(col_units, sched, gcd=cfg.gcd)
            obs.free()
            keep, keep_kv = _heads_kept(w, p, units, removed)
            info["attn_error"] = err
        info["removed_heads"] = sorted(h for h in range(w.n_heads) if h not in keep)
        apply_head_pruning(adapter, block, keep, keep_kv)
    n_ch = p.ffn[0] - p.ffn[1]
    if n_ch > 0:
        roles = _linear_roles(adapter, block)
        if magnitude:
            gone = magnitude_channels(adapter, block, n_ch)
        else:
            obs = _collect(adapter, block, roles["down_proj"], f"block {origin} down_proj", cfg.percdamp,
                           hidden, ctxs, i)
            gone, err = obs.prune_channels(n_ch, dgs=cfg.dgs, group_min=cfg.ffn_group_min,
                                           group_max=cfg.ffn_group_max)
            obs.free()
            info["ffn_error"] = err
        gone_set = set(gone)
        apply_ffn_pruning(adapter, block, [j for j in range(w.ffn) if j not in gone_set])
    if not magnitude:
        hidden = [adapter.run_block(block, h, ctx, i) for h, ctx in zip(hidden, ctxs, strict=True)]
    logger.debug("block %d: heads %s, kv %s, ffn %s", origin, p.heads, p.kv_heads, p.ffn)
    return hidden, info


@register_method("slimgpt", "magnitude")
def run_slimgpt(adapter: DecoderAdapter, tokenizer, cfg: SlimGPTConfig, step: StepReport) -> None:
    """Runner for ``slimgpt`` (OBS) and ``magnitude`` (baseline): plan, calibrate, prune."""
    plan = plan_widths(adapter, cfg)  # raises before any calibration work
    calib = None if cfg.method == "magnitude" else calibration_for(tokenizer, cfg)
    prune_widths(adapter, calib, cfg, plan, step)
