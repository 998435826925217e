"""Calibration and evaluation text: embedded corpora, hub data sets, local files."""

from .embedded import DataError, embedded_split
from .sources import (
    calibration_windows,
    check_source,
    documents,
    eval_tokens,
    heldout_windows,
    known_sources,
    token_stream,
)

__all__ = [
    "DataError",
    "calibration_windows",
    "check_source",
    "documents",
    "embedded_split",
    "eval_tokens",
    "heldout_windows",
    "known_sources",
    "token_stream",
]
