"""Adapter for Phi-3 (and Phi-3.5/Phi-4-mini, same module layout): fused ``qkv_proj`` and ``gate_up_proj``.

Phi-3 keeps the LLaMA block layout but fuses two groups of projections:

* ``self_attn.qkv_proj`` (role ``qkv_proj``) has ``(H + 2·K)·d`` output rows: rows
  ``[0, H·d)`` are the queries, ``[H·d, (H+K)·d)`` the keys and ``[(H+K)·d, (H+2K)·d)`` the
  values (H query heads, K key/value heads, d = head_dim), as ``Phi3Attention.forward`` slices
  them; :meth:`Phi3Adapter.qkv_slices` returns those row ranges;
* ``mlp.gate_up_proj`` (role ``gate_up_proj``) has ``2·I`` rows: ``[0, I)`` gate, ``[I, 2I)``
  up (``chunk(2, dim=-1)`` in ``Phi3MLP``); see :meth:`Phi3Adapter.gate_up_slices`.

:meth:`linear_roles` returns the fused modules under the roles ``qkv_proj``, ``o_proj``,
``gate_up_proj`` and ``down_proj``: each is an ordinary ``nn.Linear`` (weight ``[out, in]``), so
role-wise fusion (FuseGPT), which merges a removed block's weights into the same role of its
neighbours, works on them unchanged. Width pruning of heads is not supported: the stock attention
slices the fused output with ``config.num_attention_heads``, a single value for all layers, so
:meth:`set_attention_geometry` refuses.
"""

from __future__ import annotations

from torch import nn

from .base import DecoderAdapter
from .registry import register_adapter


@register_adapter
class Phi3Adapter(DecoderAdapter):
    """Phi-3: RMSNorm, rotary (optionally partial / LongRoPE), fused qkv and gate_up projections."""

    model_types = ("phi3",)
    _PARENT = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}

    def linear_roles(self, block: nn.Module) -> dict[str, nn.Linear]:
        attn, mlp = block.self_attn, block.mlp
        return {"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
                "down_proj": mlp.down_proj}

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        if role not in self._PARENT:
            raise KeyError(f"Phi-3 blocks have no role {role!r}; roles: {', '.join(self._PARENT)}")
        setattr(getattr(block, self._PARENT[role]), role, module)

    def layer_type(self, index: int) -> str:
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    # ------------------------------------------------------------------ geometry
    def num_kv_heads(self, block: nn.Module) -> int:
        return block.self_attn.num_key_value_heads

    def num_heads(self, block: nn.Module) -> int:
        rows = self.linear_roles(block)["qkv_proj"].out_features
        return rows // self.head_dim - 2 * self.num_kv_heads(block)

    def intermediate_size(self, block: nn.Module) -> int:
        return self.linear_roles(block)["gate_up_proj"].out_features // 2

    def qkv_slices(self, block: nn.Module) -> dict[str, slice]:
        """Row ranges of ``q``, ``k`` and ``v`` inside ``qkv_proj.weight``."""
        d, h, k = self.head_dim, self.num_heads(block), self.num_kv_heads(block)
        return {"q_proj": slice(0, h * d), "k_proj": slice(h * d, (h + k) * d),
                "v_proj": slice((h + k) * d, (h + 2 * k) * d)}

    def gate_up_slices(self, block: nn.Module) -> dict[str, slice]:
        """Row ranges of ``gate`` and ``up`` inside ``gate_up_proj.weight``."""
        i = self.intermediate_size(block)
        return {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}

    def set_attention_geometry(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        raise NotImplementedError(
            "head pruning is not supported for Phi-3: its attention slices the fused qkv_proj with "
            "config.num_attention_heads, one value for all layers"
        )
