"""The export's error type and the guarded import of the optional ``gguf`` package."""

from __future__ import annotations

from ...errors import FusegptError


class ExportError(FusegptError, ValueError):
    """The model or tokenizer cannot be written as GGUF; the message says why."""


def gguf_module():
    """The ``gguf`` package, or an :class:`ExportError` saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf (or fusegpt[embedded])") from None
    return gguf
