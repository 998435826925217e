"""Explicit registry of adapters keyed by ``config.model_type`` (filled by a decorator)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..errors import UnsupportedModelError
from .base import DecoderAdapter

_ADAPTERS: dict[str, type[DecoderAdapter]] = {}


def register_adapter(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    """Class decorator: register ``cls`` for every name in ``cls.model_types``."""
    for name in cls.model_types:
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"model_type {name!r} is already served by {_ADAPTERS[name].__name__}")
        _ADAPTERS[name] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type[DecoderAdapter]:
    """The adapter class for ``model_type``; an :class:`UnsupportedModelError` listing the supported ones otherwise."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}: pruning needs an adapter, and fusegpt has them for "
            f"{', '.join(supported_model_types())} (fusegpt eval still measures any causal LM's perplexity)"
        ) from None


def check_supported(config) -> None:
    """Raise the unsupported-architecture error from a config alone (before loading weights)."""
    adapter_class(getattr(config, "model_type", "?"))


def get_adapter(model: nn.Module, origin: Sequence[int] | None = None) -> DecoderAdapter:
    """Wrap ``model`` in the adapter registered for its ``config.model_type``.

    ``origin``: original index of each current block, for a model pruned before (default 0…L−1).
    """
    return adapter_class(model.config.model_type)(model, origin)


AdapterFactory = Callable[[nn.Module], DecoderAdapter]
