"""The candidate loop that MI and SLEB share: score every block by skipping it.

X_i (the state entering block i) is the same with or without block i, so each candidate only
needs blocks i+1 … L−1 run from X_i (``cache_prefix=True``, about L²/2 block passes instead of
L² when every candidate restarts from the embeddings). The cached path runs block-outer (all
tracks through block j, then j+1), so a layer-wise (offloaded) model brings each block in once
per batch. Both paths give the same scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..models import DecoderAdapter

# metric(hidden_without_block, reference_hidden, input_ids) -> (sum over tokens, token count)
Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def candidate_blocks(n_layers: int, early_barrier: int = 0, latter_barrier: int = 0) -> list[int]:
    """Blocks that may be removed: all but the first ``early_barrier`` and last ``latter_barrier``."""
    cands = list(range(early_barrier, n_layers - latter_barrier))
    if not cands:
        raise ValueError(f"barriers {early_barrier}+{latter_barrier} leave no candidate among {n_layers} blocks")
    return cands


@torch.no_grad()
def skip_one_scores(
    adapter: DecoderAdapter,
    calib: torch.Tensor,
    metric: Metric,
    candidates: Sequence[int] | None = None,
    batch_size: int = 1,
    cache_prefix: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """Mean of ``metric`` over all calibration tokens, for the model with each candidate skipped.

    Returns a tensor of length ``num_layers`` with NaN for blocks that are not candidates.
    """
    n_layers = adapter.num_layers
    candidates = list(range(n_layers)) if candidates is None else list(candidates)
    sums = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    batches = list(calib.split(batch_size))
    bar = tqdm(total=len(batches) * len(candidates), desc=desc, leave=False, unit="cand")
    for ids in batches:
        ids = ids.to(adapter.device)
        h = adapter.embed(ids)
        ctx = adapter.context(h)
        if cache_prefix:
            outs, ref = _skip_one_lockstep(adapter, h, ctx, candidates, bar)
        else:
            ref = adapter.run_blocks(h, 0, n_layers, ctx)
            outs = {}
            for i in candidates:
                outs[i] = adapter.run_blocks(h, 0, n_layers, ctx, skip=(i,))
                bar.update(1)
        n_tok = 0
        for i in candidates:
            s, n_tok = metric(outs[i], ref, ids)
            sums[i] += float(s)
        count += n_tok
        del outs
    bar.close()
    scores = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    scores[candidates] = sums[candidates] / max(count, 1)
    return scores


def _skip_one_lockstep(adapter: DecoderAdapter, h: torch.Tensor, ctx, candidates: Sequence[int],
                       bar) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of the model with each candidate skipped, and the full model's output, block-outer.

    Block j runs once on the reference track and once on every track whose skipped block came
    before j; the track of candidate j starts from the state entering j. Each block is used
    once per batch (it comes onto the device once when the model is offloaded); the operations
    are those of restarting every candidate from its cached prefix.
    """
    tracks: dict[int, torch.Tensor] = {}
    cand = set(candidates)
    ref = h
    for j in range(adapter.num_layers):
        with adapter.using([j]):
            block = adapter.layers[j]
            for i in list(tracks):
                tracks[i] = adapter.run_block(block, tracks[i], ctx, j)
            if j in cand:
                tracks[j] = ref
            ref = adapter.run_block(block, ref, ctx, j)
    bar.update(len(tracks))
    return tracks, ref


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest non-NaN scores (ties broken by lower index), ascending by score."""
    valid = [(float(s), i) for i, s in enumerate(scores.tolist()) if s == s]
    if k > len(valid):
        raise ValueError(f"cannot pick {k} blocks from {len(valid)} candidates")
    return [i for _, i in sorted(valid)[:k]]
