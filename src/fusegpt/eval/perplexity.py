"""Perplexity, GPTQ protocol (ALGORITHMS.md §4).

Join the test split with blank lines, tokenize once, cut into ``n = numel // seqlen``
non-overlapping windows (the tail is dropped), ``ppl = exp(Σ mean-CE·seqlen / (n·seqlen))``.
GPTQ's loss on a window averages the ``seqlen − 1`` shifted predictions; we do the same.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model,
    tokens: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    desc: str = "ppl",
) -> float:
    """Perplexity of ``model`` on the 1-D ``tokens`` stream (optionally capped at ``max_tokens``)."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}")
    windows = tokens[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, unit="win"):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1).mean(dim=1)
        nll += float(loss.sum()) * seqlen
    model.train(was_training)
    ppl = math.exp(nll / (n * seqlen))
    logger.info("%s: %.3f over %d windows of %d tokens", desc, ppl, n, seqlen)
    return ppl
