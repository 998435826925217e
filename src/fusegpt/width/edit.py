"""Structural edits of a block: keep some query/K/V heads, keep some FFN channels."""

from __future__ import annotations

import torch
from torch import nn

from ..models import DecoderAdapter
from .geometry import BlockWidth, width_roles
from .plan import LayerPlan


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
    r = width_roles(adapter, block)
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
    r = width_roles(adapter, block)
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


def heads_kept(w: BlockWidth, p: LayerPlan, units: list[list[int]], removed: list[int]) -> tuple[list[int], list[int]]:
    gone = {h for u in removed for h in units[u]}
    keep = [h for h in range(w.n_heads) if h not in gone]
    keep_kv = sorted({h // w.group for h in keep})
    return keep, keep_kv
