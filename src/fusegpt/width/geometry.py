"""Widths of a decoder block and what one head, K/V head or FFN channel costs in parameters.

**GQA rule.** Query head ``h`` reads K/V head ``h // g`` (g = query heads per K/V head).
``equal_per_group`` (default for GQA) removes the same number of query heads from every K/V
group, so every group keeps g' heads and the K/V heads stay; ``kv_groups`` (the only choice for
MHA, where g = 1) removes whole groups: their query heads, their K and V rows. Either way the
pruned attention is an ordinary GQA attention with ``n_heads' = n_kv' · g'``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import DecoderAdapter
from ..settings import ConfigError

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


def width_roles(adapter: DecoderAdapter, block: nn.Module) -> dict[str, nn.Linear]:
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
    r = width_roles(adapter, block)
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
