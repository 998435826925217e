"""Macro Influence (FuseGPT): 1 − mean cos(X_L, X_L^(−i)) over calibration tokens.

X_L is the output of the last block **before the final norm**. Low MI = little influence; the
block with the lowest MI is removed (the reference code's choice: highest cosine similarity,
ALGORITHMS.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models import DecoderAdapter
from .common import skip_one_scores


def _cosine_metric(out: torch.Tensor, ref: torch.Tensor, _ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)
    return cos.double().sum(), cos.numel()


def mi_scores(
    adapter: DecoderAdapter,
    calib: torch.Tensor,
    candidates: Sequence[int] | None = None,
    batch_size: int = 1,
    cache_prefix: bool = True,
) -> torch.Tensor:
    """MI of every block of the current model (NaN for non-candidates)."""
    cos = skip_one_scores(adapter, calib, _cosine_metric, candidates, batch_size, cache_prefix, desc="MI")
    return 1.0 - cos
