"""SlimGPT's choice of heads and FFN channels: Optimal Brain Surgeon on cached block inputs.

For each block: the inputs of ``o_proj`` feed an :class:`~fusegpt.obs.OBSLayer` (the forward
stops there); heads are chosen by Batched Greedy Pruning with OBS compensation of ``o_proj``
(grouped Cholesky over a head's columns unless ``gcd=False``). After the heads are cut the block
runs again up to ``down_proj``, whose inputs feed a second OBSLayer; FFN channels are chosen with
Dynamic Group Size (``dgs``) and compensated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...models import DecoderAdapter
from ...obs import OBSLayer, StopForward
from ...width import BlockWidth, LayerPlan, head_units, heads_kept, width_roles
from .config import SlimGPTConfig


def collect(adapter: DecoderAdapter, block: nn.Module, layer: nn.Linear, name: str, percdamp: float,
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


class OBSChooser:
    """:class:`~fusegpt.width.UnitChooser` of SlimGPT."""

    needs_calibration = True

    def __init__(self, cfg: SlimGPTConfig):
        self.cfg = cfg

    def heads(self, adapter: DecoderAdapter, block: nn.Module, index: int, w: BlockWidth, p: LayerPlan,
              hidden: list[torch.Tensor], ctxs: list, info: dict[str, Any]) -> tuple[list[int], list[int]]:
        origin = info["layer"]
        obs = collect(adapter, block, width_roles(adapter, block)["o_proj"], f"block {origin} o_proj",
                      self.cfg.percdamp, hidden, ctxs, index)
        units, sched = head_units(w, p)
        d = w.head_dim
        col_units = [[h * d + j for h in u for j in range(d)] for u in units]
        removed, err = obs.prune_units(col_units, sched, gcd=self.cfg.gcd)
        obs.free()
        info["attn_error"] = err
        return heads_kept(w, p, units, removed)

    def channels(self, adapter: DecoderAdapter, block: nn.Module, index: int, n_remove: int,
                 hidden: list[torch.Tensor], ctxs: list, info: dict[str, Any]) -> list[int]:
        obs = collect(adapter, block, width_roles(adapter, block)["down_proj"], f"block {info['layer']} down_proj",
                      self.cfg.percdamp, hidden, ctxs, index)
        gone, err = obs.prune_channels(n_remove, dgs=self.cfg.dgs, group_min=self.cfg.ffn_group_min,
                                       group_max=self.cfg.ffn_group_max)
        obs.free()
        info["ffn_error"] = err
        return gone
