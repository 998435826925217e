"""Removing whole blocks: :func:`remove_blocks` only cuts (the scorers in
:mod:`fusegpt.importance` only score; the methods alternate the two)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models import DecoderAdapter


def remove_blocks(adapter: DecoderAdapter, indices: Sequence[int]) -> list[int]:
    """Remove the blocks at current ``indices``; returns their original indices.

    Re-indexes attention ``layer_idx``, ``config.num_hidden_layers`` and ``config.layer_types``
    (through the adapter), so generation with a KV cache works afterwards.
    """
    drop = set(indices)
    n = adapter.num_layers
    if not drop:
        return []
    if not drop <= set(range(n)):
        raise ValueError(f"block indices {sorted(drop)} out of range for {n} blocks")
    if len(drop) >= n:
        raise ValueError(f"removing {len(drop)} of {n} blocks would leave none")
    origin = adapter.origin
    adapter.keep_layers([i for i in range(n) if i not in drop])
    return [origin[i] for i in indices]


def scores_by_origin(adapter: DecoderAdapter, scores: torch.Tensor) -> dict[int, float]:
    origin = adapter.origin
    return {origin[i]: float(s) for i, s in enumerate(scores.tolist()) if s == s}
