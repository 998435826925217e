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

from ..errors import DataError

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
        raise DataError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}; lower the seqlen")
    windows = tokens[: n * seqlen].view(n, seqlen)
    from ..offload import offloader_of

    if offloader_of(model) is not None:
        ppl = _perplexity_layerwise(model, windows, batch_size, desc)
        logger.info("%s: %.3f over %d windows of %d tokens (layer-wise)", desc, ppl, n, seqlen)
        return ppl
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, unit="win"):
        batch = windows[i : i + batch_size].to(device)
        nll += _window_nll(model(batch, use_cache=False).logits.float(), batch)
    model.train(was_training)
    ppl = math.exp(nll / (n * seqlen))
    logger.info("%s: %.3f over %d windows of %d tokens", desc, ppl, n, seqlen)
    return ppl


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Σ over windows of (mean shifted cross-entropy × seqlen)."""
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    ).view(batch.shape[0], -1).mean(dim=1)
    return float(loss.sum()) * batch.shape[1]


@torch.no_grad()
def _perplexity_layerwise(model, windows: torch.Tensor, batch_size: int, desc: str) -> float:
    """The same perplexity on an offloaded model: all windows through block 0, then block 1, …

    Each block comes onto the device once; the hidden states of every window wait between
    blocks (on the CPU when computing on a GPU), ``n·seqlen·hidden`` values in all.
    """
    from ..models import get_adapter

    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    batches = list(windows.split(batch_size))
    chunks = [adapter.embed(b.to(adapter.device)) for b in batches]
    ctxs = adapter.contexts(chunks)
    bar = tqdm(total=adapter.num_layers, desc=f"{desc} (layer-wise)", leave=False, unit="block")
    for i in range(adapter.num_layers):
        chunks = adapter.run_layerwise(chunks, ctxs, i, i + 1)
        bar.update(1)
    bar.close()
    nll = 0.0
    for h, b in zip(chunks, batches, strict=True):
        nll += _window_nll(adapter.logits(h.to(adapter.device)).float(), b.to(adapter.device))
    model.train(was_training)
    return math.exp(nll / windows.numel())
