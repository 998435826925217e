"""Adapters for LLaVA (``LlavaForConditionalGeneration``) and Gemma 3's multimodal models
(``Gemma3ForConditionalGeneration``): prune the language tower only.

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

from ..errors import UnsupportedModelError
from .base import DecoderAdapter
from .registry import adapter_class, register_adapter

_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


@cache
def _combined(tower_cls: type[DecoderAdapter], text_cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    return type(f"{tower_cls.__name__.removesuffix('Adapter')}{text_cls.__name__}", (tower_cls, text_cls),
                {"model_types": (), "_text_family": text_cls})


@register_adapter
class LlavaAdapter(DecoderAdapter):
    """LLaVA: the language tower's blocks, with the text family's adapter behaviour."""

    model_types = ("llava",)
    auto_class = "AutoModelForImageTextToText"  # not an AutoModelForCausalLM type; its language tower is pruned
    text_types: tuple[str, ...] = _TEXT_TYPES
    _text_family: type[DecoderAdapter] | None = None  # set on the combined classes

    def __new__(cls, model: nn.Module, origin=None):
        if cls._text_family is not None:
            return super().__new__(cls)
        text_type = model.config.text_config.model_type
        if text_type not in cls.text_types:
            raise UnsupportedModelError(f"{model.config.model_type} with a {text_type!r} language tower is not supported; "
                             f"supported towers: {', '.join(cls.text_types)}")
        return super().__new__(_combined(cls, adapter_class(text_type)))

    def __init__(self, model: nn.Module, origin=None):
        super().__init__(model, origin)
        self.config = model.config.text_config

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    def stream_writers(self) -> list[nn.Linear]:
        proj = self.model.model.multi_modal_projector
        return [proj.linear_2] if isinstance(getattr(proj, "linear_2", None), nn.Linear) else []

    @property
    def vision_modules(self) -> list[nn.Module]:
        """The modules pruning leaves alone: vision tower and multimodal projector."""
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]


@register_adapter
class Gemma3VisionAdapter(LlavaAdapter):
    """Gemma 3's multimodal models (``Gemma3ForConditionalGeneration``, 4B and up): the same layout
    as LLaVA in transformers 5 (``model.model.language_model`` is a ``Gemma3TextModel``,
    ``model.lm_head``), with Gemma 3's text adapter for the blocks (local/global layers, RoPE base
    per kind, soft-capping). The vision tower and projector are never touched; its projector has
    no linear layer writing the stream (a matrix parameter after an RMSNorm), and Gemma 3's
    post-norms make SliceGPT refuse it anyway."""

    model_types = ("gemma3",)
    text_types = ("gemma3_text",)

    def stream_writers(self) -> list[nn.Linear]:
        return []
