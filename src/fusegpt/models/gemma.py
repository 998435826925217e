"""Adapters for Gemma, Gemma-2 and Gemma 3 (text).

Both keep the LLaMA module layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, rotary embeddings), so the base class runs them; what differs lives
inside the stock modules and is reused as is:

* the embedding is scaled by ``sqrt(hidden_size)`` inside ``embed_tokens``
  (``GemmaTextScaledWordEmbedding``), so :meth:`DecoderAdapter.embed` gives the scaled states;
* the RMSNorms compute ``x̂ · (1 + w)`` (weights are stored zero-centred). Code that edits norm
  weights directly must keep that in mind; group training only trains them, which is fine;
* Gemma-2 adds ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm`` (sandwich
  norms) — four trainable norms per block — soft-caps attention logits inside the attention
  module, alternates sliding/full attention through ``config.layer_types`` and soft-caps the
  final logits, which :meth:`Gemma2Adapter.logits` reproduces;
* Gemma 3 (``gemma3_text``) keeps Gemma-2's four norms per block, adds q/k RMSNorms inside the
  attention (per head_dim, shared by all heads, so head pruning leaves them as they are), and
  gives local (sliding) and global layers their own RoPE base: the rotary module takes the layer
  type, so :meth:`DecoderAdapter.context` builds one table per attention kind and each block gets
  its own kind's table. After a block removal ``config.layer_types`` shrinks with the blocks, so
  every remaining block keeps its own pattern and base. FuseGPT may fuse a removed local block
  into a global neighbour (or the reverse): the fused weights then run under the neighbour's RoPE
  base and mask; the coefficients are trained in that setting, which is what the group loss sees.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DecoderAdapter
from .registry import register_adapter


@register_adapter
class GemmaAdapter(DecoderAdapter):
    """Gemma (1): scaled embeddings and (1 + w) RMSNorm, both inside the stock modules."""

    model_types = ("gemma",)


@register_adapter
class Gemma2Adapter(DecoderAdapter):
    """Gemma-2: sandwich norms, sliding/full layers, attention and final logit soft-capping.

    The stock model does not support SDPA (soft-capping); load it with ``attn_implementation="eager"``.
    """

    model_types = ("gemma2",)
    residual_down_proj = False  # a norm follows the FFN (and the attention)
    attn_implementation = "eager"  # Gemma-2 soft-caps attention logits: no SDPA

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        return [*super().norm_modules(block), block.pre_feedforward_layernorm, block.post_feedforward_layernorm]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


@register_adapter
class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3 text model: Gemma-2's layout plus q/k norms and a RoPE base per attention kind (SDPA)."""

    model_types = ("gemma3_text",)
    attn_implementation = "sdpa"

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        return [*super().norm_modules(block), block.self_attn.q_norm, block.self_attn.k_norm]
