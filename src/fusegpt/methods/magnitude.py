"""Width-pruning baseline: drop the heads / FFN channels of least weight norm, no OBS update."""

from __future__ import annotations

from collections.abc import Callable
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


RowStat = Callable[[nn.Module, str, nn.Linear, int], torch.Tensor]


def squared_norms(block: nn.Module, role: str, lin: nn.Linear, dim: int) -> torch.Tensor:
    """Squared L2 norm of each row (``dim=1`` sums over it) or column (``dim=0``) of the weight."""
    return lin.weight.float().pow(2).sum(dim=dim)


class ScoreChooser:
    """:class:`~fusegpt.width.UnitChooser` that drops the units of least score, no compensation.

    ``stat(block, role, linear, dim)`` gives one number per row (``dim=1``) or column (``dim=0``)
    of a projection; a head scores its q rows + o columns (+ its K/V group's k/v rows when whole
    groups go), an FFN channel its gate/up rows + down column. Weight norms for the magnitude
    baseline; first-order Taylor terms for LLM-Pruner.
    """

    needs_calibration = False

    def __init__(self, stat: RowStat = squared_norms):
        self.stat = stat

    def _stat(self, block: nn.Module, roles: dict[str, nn.Linear], role: str, dim: int) -> torch.Tensor:
        return self.stat(block, role, roles[role], dim).float()

    def heads(self, adapter: DecoderAdapter, block: nn.Module, index: int, w: BlockWidth, p: LayerPlan,
              hidden, ctxs, info: dict[str, Any]) -> tuple[list[int], list[int]]:
        r = width_roles(adapter, block)
        d = w.head_dim
        q = self._stat(block, r, "q_proj", 1).view(w.n_heads, d).sum(1)
        o = self._stat(block, r, "o_proj", 0).view(w.n_heads, d).sum(1)
        per_head = q + o
        units, sched = head_units(w, p)
        if p.rule == "kv_groups":
            kv = (self._stat(block, r, "k_proj", 1) + self._stat(block, r, "v_proj", 1)).view(w.n_kv, d).sum(1)
            scores = torch.stack([per_head[u].sum() + kv[k] for k, u in enumerate(units)])
        else:
            scores = per_head
        return heads_kept(w, p, units, magnitude_order(scores, sched))

    def channels(self, adapter: DecoderAdapter, block: nn.Module, index: int, n_remove: int, hidden, ctxs,
                 info: dict[str, Any]) -> list[int]:
        r = width_roles(adapter, block)
        s = self._stat(block, r, "gate_proj", 1) + self._stat(block, r, "up_proj", 1) + \
            self._stat(block, r, "down_proj", 0)
        return torch.argsort(s)[:n_remove].tolist()


register(Method(
    name="magnitude",
    config_cls=MagnitudeWidthConfig,
    run=lambda ctx, cfg, step: run_width(ctx, cfg, step, ScoreChooser()),
    estimate_memory=lambda g, cfg, env: width_memory(g, cfg, env, obs=False),
    estimate_time=lambda g, cfg, env: 1.0,
    summary="magnitude: width baseline, drop heads / FFN channels of least weight norm (no calibration)",
    kind="width",
))
