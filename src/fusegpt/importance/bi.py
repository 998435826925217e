"""Block Influence (ShortGPT): BI_i = 1 − mean cos(X_i, X_{i+1}) over calibration tokens.

X_i is the state entering block i and X_{i+1} the state leaving it, both before any final norm.
One forward pass scores all blocks; the k lowest are removed in one shot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import DecoderAdapter


@torch.no_grad()
def bi_scores(adapter: DecoderAdapter, calib: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """BI of every block of the current model."""
    n_layers = adapter.num_layers
    sums = torch.zeros(n_layers, dtype=torch.float64)
    chunks = [adapter.embed(ids.to(adapter.device)) for ids in calib.split(batch_size)]
    ctxs = adapter.contexts(chunks)
    for i in range(n_layers):
        with adapter.using([i]):
            nxt = [adapter.run_block(adapter.layers[i], h, ctx, i) for h, ctx in zip(chunks, ctxs, strict=True)]
        for h, o in zip(chunks, nxt, strict=True):
            sums[i] += F.cosine_similarity(h.float(), o.float(), dim=-1).double().sum()
        chunks = nxt
    count = calib.numel()
    return 1.0 - sums / count
