"""Width-pruning baseline: drop the heads / FFN channels of least weight norm, no OBS update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..models import DecoderAdapter
from ..obs import magnitude_order
from ..width import BlockWidth, LayerPlan, head_units, heads_kept, width_roles
from .registry import Method, register
from .slimgpt import SlimGPTConfig, run_width, width_memory


@dataclass
class MagnitudeWidthConfig(SlimGPTConfig):
    """Width-pruning baseline: drop the heads / FFN channels of least weight norm, no OBS update.

    Same budget, schedule and GQA rule as SlimGPT; needs no calibration data. Scores: squared
    L2 norm of every weight tied to the unit (q rows + o columns (+ k/v rows for whole K/V
    groups); gate/up rows + down columns).
    """

    method: ClassVar[str] = "magnitude"


def _sq_rows(W: torch.Tensor) -> torch.Tensor:
    return W.float().pow(2).sum(dim=1)


class MagnitudeChooser:
    """:class:`~fusegpt.width.UnitChooser` by weight norms (no calibration)."""

    needs_calibration = False

    def heads(self, adapter: DecoderAdapter, block: nn.Module, index: int, w: BlockWidth, p: LayerPlan,
              hidden, ctxs, info: dict[str, Any]) -> tuple[list[int], list[int]]:
        r = width_roles(adapter, block)
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
        return heads_kept(w, p, units, magnitude_order(scores, sched))

    def channels(self, adapter: DecoderAdapter, block: nn.Module, index: int, n_remove: int, hidden, ctxs,
                 info: dict[str, Any]) -> list[int]:
        r = width_roles(adapter, block)
        s = _sq_rows(r["gate_proj"].weight) + _sq_rows(r["up_proj"].weight) + r["down_proj"].weight.float().pow(2).sum(0)
        return torch.argsort(s)[:n_remove].tolist()


register(Method(
    name="magnitude",
    config_cls=MagnitudeWidthConfig,
    run=lambda ctx, cfg, step: run_width(ctx, cfg, step, MagnitudeChooser()),
    estimate_memory=lambda g, cfg, env: width_memory(g, cfg, env, obs=False),
    estimate_time=lambda g, cfg, env: 1.0,
    summary="magnitude: width baseline, drop heads / FFN channels of least weight norm (no calibration)",
    kind="width",
))
