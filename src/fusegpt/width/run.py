"""The width-pruning pass: block by block on cached hidden states, a chooser picks what goes.

Block l sees the outputs of the already-pruned blocks 0…l−1. For each block the chooser
(:class:`UnitChooser`: OBS for SlimGPT, weight norms for the magnitude baseline) picks the heads
to remove and then the FFN channels; :mod:`fusegpt.width.edit` cuts them; the pruned block then
produces the inputs of block l+1 (only when the chooser needs calibration states).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import DecoderAdapter
from ..report import StepReport
from .edit import apply_ffn_pruning, apply_head_pruning
from .geometry import BlockWidth, block_width
from .plan import LayerPlan, WidthPlan

logger = logging.getLogger(__name__)


class UnitChooser(Protocol):
    """Chooses which heads and FFN channels of one block go (and may compensate the rest)."""

    needs_calibration: bool

    def heads(self, adapter: DecoderAdapter, block: nn.Module, index: int, w: BlockWidth, p: LayerPlan,
              hidden: list[torch.Tensor], ctxs: list, info: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(query heads kept, K/V heads kept), both sorted."""

    def channels(self, adapter: DecoderAdapter, block: nn.Module, index: int, n_remove: int,
                 hidden: list[torch.Tensor], ctxs: list, info: dict[str, Any]) -> list[int]:
        """FFN channels to remove."""


@torch.no_grad()
def prune_widths(adapter: DecoderAdapter, calib: torch.Tensor | None, chooser: UnitChooser, plan: WidthPlan,
                 step: StepReport, batch_size: int = 8, label: str = "width") -> None:
    """Prune every block to ``plan`` in place; fills ``step.details`` with the per-layer record."""
    origin = adapter.origin
    hidden: list[torch.Tensor] = []
    ctxs: list = []
    if chooser.needs_calibration:
        assert calib is not None
        for ids in calib.split(batch_size):
            h = adapter.embed(ids.to(adapter.device))
            hidden.append(h)
            ctxs.append(adapter.context(h))
    per_layer = []
    bar = tqdm(list(enumerate(adapter.layers)), desc=f"{label} blocks", unit="block")
    for i, block in bar:
        with adapter.using([i], write=True):
            hidden, info = _prune_block(adapter, chooser, plan.layers[i], i, block, hidden, ctxs, origin[i])
        per_layer.append(info)
    bar.close()
    shapes = {(adapter.num_heads(b), adapter.num_kv_heads(b), adapter.intermediate_size(b)) for b in adapter.layers}
    if len(shapes) == 1:  # every layer alike: a stock config describes it (a stock checkpoint results)
        adapter.set_uniform_widths(*shapes.pop())
    step.details.update({
        "layout": "uniform" if not shapes else "per-layer",
        "sparsity_target": plan.sparsity,
        "sparsity_basis": "decoder-block parameters at the start of the run",
        "sparsity_achieved": round(plan.achieved, 6),
        "sparsity_of_step_input": round(1 - plan.params_after / plan.params_now, 6),
        "decoder_params": {"start": plan.params_start, "before": plan.params_now, "after": plan.params_after},
        "r_max": round(plan.r_max, 6),
        "head_rule": sorted({p.rule for p in plan.layers}),
        "layers": per_layer,
    })
    logger.info("%s: decoder params %d -> %d (%.2f%% of the start), r_max %.4f", label, plan.params_now,
                plan.params_after, 100 * plan.achieved, plan.r_max)


def _prune_block(adapter: DecoderAdapter, chooser: UnitChooser, p: LayerPlan, i: int, block: nn.Module,
                 hidden: list[torch.Tensor], ctxs: list, origin: int) -> tuple[list[torch.Tensor], dict]:
    """Prune block ``i`` to its plan; returns the hidden states after it and its report."""
    w = block_width(adapter, block)
    info: dict[str, Any] = {"layer": origin, "ratio_target": round(p.ratio_target, 5), "ratio": round(p.ratio, 5),
                            "heads": list(p.heads), "kv_heads": list(p.kv_heads), "ffn": list(p.ffn),
                            "params": list(p.params)}
    if p.heads[1] < p.heads[0]:
        keep, keep_kv = chooser.heads(adapter, block, i, w, p, hidden, ctxs, info)
        info["removed_heads"] = sorted(h for h in range(w.n_heads) if h not in keep)
        apply_head_pruning(adapter, block, keep, keep_kv)
    n_ch = p.ffn[0] - p.ffn[1]
    if n_ch > 0:
        gone = set(chooser.channels(adapter, block, i, n_ch, hidden, ctxs, info))
        apply_ffn_pruning(adapter, block, [j for j in range(w.ffn) if j not in gone])
    if chooser.needs_calibration:
        hidden = [adapter.run_block(block, h, ctx, i) for h, ctx in zip(hidden, ctxs, strict=True)]
    logger.debug("block %d: heads %s, kv %s, ffn %s", origin, p.heads, p.kv_heads, p.ffn)
    return hidden, info
