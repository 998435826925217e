"""SLEB: the calibration loss (mean token NLL) of the current model with block i removed.

SLEB's reference code ranks by perplexity on its calibration windows; mean NLL orders the
blocks identically (ppl = exp(NLL)). The block with the lowest loss is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models import DecoderAdapter
from .common import skip_one_scores


def sleb_scores(
    adapter: DecoderAdapter,
    calib: torch.Tensor,
    candidates: Sequence[int] | None = None,
    batch_size: int = 1,
    cache_prefix: bool = True,
) -> torch.Tensor:
    """Mean next-token NLL with each candidate removed (NaN for non-candidates)."""

    def nll(out: torch.Tensor, _ref: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits = adapter.logits(out).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return loss.double(), ids[:, 1:].numel()

    return skip_one_scores(adapter, calib, nll, candidates, batch_size, cache_prefix, desc="SLEB")
