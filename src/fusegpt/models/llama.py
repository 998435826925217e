"""Adapters for the LLaMA family: Llama, Mistral, Qwen2, Qwen3.

They share the module layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, two RMSNorms, rotary embeddings), so the base class serves them;
each subclass records what is particular to it.
"""

from __future__ import annotations

from torch import nn

from .base import DecoderAdapter
from .registry import register_adapter


@register_adapter
class LlamaAdapter(DecoderAdapter):
    """LLaMA-1/2/3 (MHA or GQA; optional attention/MLP biases) and SmolLM2."""

    model_types = ("llama",)


@register_adapter
class MistralAdapter(DecoderAdapter):
    """Mistral: GQA, optional sliding window over all layers (config.sliding_window)."""

    model_types = ("mistral",)

    def layer_type(self, index: int) -> str:
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"


@register_adapter
class Qwen2Adapter(DecoderAdapter):
    """Qwen2/2.5: GQA, biases on q/k/v, per-layer ``layer_types`` (full or sliding)."""

    model_types = ("qwen2",)


@register_adapter
class Qwen3Adapter(DecoderAdapter):
    """Qwen3: GQA, per-head RMSNorm on queries and keys (``q_norm``/``k_norm``).

    The q/k norms act on ``head_dim`` and are shared by all heads, so removing heads leaves
    them unchanged; they count among the block's trainable norms.
    """

    model_types = ("qwen3",)

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        return [*super().norm_modules(block), block.self_attn.q_norm, block.self_attn.k_norm]
