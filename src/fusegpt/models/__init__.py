"""Per-architecture adapters and their registry."""

from . import llama  # noqa: F401  (registers the LLaMA-family adapters)
from . import gemma, gpt2, llava, opt, phi3  # noqa: F401  (register the other families)
from .base import ROLES, BlockContext, DecoderAdapter
from .registry import adapter_class, check_supported, get_adapter, register_adapter, supported_model_types

__all__ = [
    "ROLES",
    "BlockContext",
    "DecoderAdapter",
    "adapter_class",
    "check_supported",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
