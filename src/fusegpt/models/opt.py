"""Adapter for OPT (facebook/opt-*): LayerNorm, biases, learned positions, no rotary, no gate.

Layout: ``model.model.decoder.layers[i]`` with ``self_attn.{q,k,v,out}_proj`` and ``fc1``/``fc2``.
Roles map as ``o_proj → self_attn.out_proj``, ``up_proj → fc1``, ``down_proj → fc2``; there is no
``gate_proj``, so :meth:`linear_roles` returns six roles. All are ``nn.Linear`` with biases.

The embedding adds learned positions (``embed_positions``, offset 2) after the optional
``project_in``; the head applies the optional final LayerNorm and ``project_out`` (OPT-350m:
post-LN blocks, 512-wide embeddings). Attention is multi-head (K = H), causal, no sliding window.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DecoderAdapter
from .registry import register_adapter


@register_adapter
class OPTAdapter(DecoderAdapter):
    """OPT: pre-LN (or post-LN for OPT-350m) blocks with biases and learned positions."""

    model_types = ("opt",)
    _ATTR = {"q_proj": ("self_attn", "q_proj"), "k_proj": ("self_attn", "k_proj"), "v_proj": ("self_attn", "v_proj"),
             "o_proj": ("self_attn", "out_proj"), "up_proj": (None, "fc1"), "down_proj": (None, "fc2")}

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.final_layer_norm or nn.Identity()

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def linear_roles(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {role: getattr(getattr(block, p) if p else block, name) for role, (p, name) in self._ATTR.items()}

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        if role not in self._ATTR:
            raise KeyError(f"OPT blocks have no role {role!r}; roles: {', '.join(self._ATTR)}")
        parent, name = self._ATTR[role]
        setattr(getattr(block, parent) if parent else block, name, module)

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn_layer_norm, block.final_layer_norm]

    def intermediate_size(self, block: nn.Module) -> int:
        return block.fc1.out_features

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        input_ids = input_ids.to(self.device)
        h = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        positions = torch.arange(input_ids.shape[1], device=h.device).unsqueeze(0)
        pos = dec.embed_positions(torch.ones_like(input_ids), 0, position_ids=positions)
        return h + pos.to(h.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(hidden)
        if self.decoder.project_out is not None:
            h = self.decoder.project_out(h)
        return self.lm_head(h)
