"""Per-architecture adapters and their registry."""

from . import gemma, gpt2, llama, llava, opt, phi3  # noqa: F401  (each module registers its adapters)
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
