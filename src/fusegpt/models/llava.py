"""Adapter for LLaVA (``LlavaForConditionalGeneration``): prune the language tower only.

In transformers 5 the text decoder lives at ``model.model.language_model`` (a bare decoder such as
``LlamaModel``: ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and the LM head at
``model.lm_head``; the vision tower (``model.model.vision_tower``) and projector
(``model.model.multi_modal_projector``) are never touched.

``get_adapter`` on a LLaVA model returns an instance of a class that combines
:class:`LlavaAdapter` with the adapter of the text tower's family (``text_config.model_type``),
so the family's specifics (Gemma-2 soft-capping, Qwen3 q/k norms, ...) still apply. The adapter's
``config`` is ``config.text_config``: :meth:`keep_layers` therefore fixes
``text_config.num_hidden_layers`` (and ``layer_types``), which is what a stock reload reads.

Calibration with the adapter is text only (``embed`` looks tokens up; image placeholders in the
ids would be embedded as ordinary tokens). Text towers whose decoder is not ``language_model``
with ``.layers`` (OPT, GPT-2 layouts) are refused.
"""

from __future__ import annotations

from functools import cache

from torch import nn

from .base import DecoderAdapter
from .registry import adapter_class, register_adapter

_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


@cache
def _combined(text_cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    return type(f"Llava{text_cls.__name__}", (LlavaAdapter, text_cls), {"model_types": ()})


@register_adapter
class LlavaAdapter(DecoderAdapter):
    """LLaVA: the language tower's blocks, with the text family's adapter behaviour."""

    model_types = ("llava",)
    auto_class = "AutoModelForImageTextToText"  # not an AutoModelForCausalLM type; its language tower is pruned

    def __new__(cls, model: nn.Module, origin=None):
        if cls is not LlavaAdapter:
            return super().__new__(cls)
        text_type = model.config.text_config.model_type
        if text_type not in _TEXT_TYPES:
            raise ValueError(f"LLaVA with a {text_type!r} language tower is not supported; "
                             f"supported towers: {', '.join(_TEXT_TYPES)}")
        return super().__new__(_combined(adapter_class(text_type)))

    def __init__(self, model: nn.Module, origin=None):
        super().__init__(model, origin)
        self.config = model.config.text_config

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_modules(self) -> list[nn.Module]:
        """The modules pruning leaves alone: vision tower and multimodal projector."""
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]
