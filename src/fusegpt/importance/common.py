"""The candidate loop that MI and SLEB share: score every block by skipping it.

X_i (the state entering block i) is the same with or without block i, so for each batch the
states X_0 … X_L of the current model are computed once and each candidate runs only blocks
i+1 … L−1 from X_i (``cache_prefix=True``, about L²/2 block passes instead of L² when every
candidate restarts from the embeddings). Both paths give the same scores.
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
        states = [h]
        for i in range(n_layers):
            states.append(adapter.run_block(adapter.layers[i], states[-1], ctx, i))
        ref = states[-1]
        n_tok = 0
        for i in candidates:
            if cache_prefix:
                out = adapter.run_blocks(states[i], i + 1, n_layers, ctx)
            else:
                out = adapter.run_blocks(states[0], 0, n_layers, ctx, skip=(i,))
            s, n_tok = metric(out, ref, ids)
            sums[i] += float(s)
            bar.update(1)
        count += n_tok
        del states
    bar.close()
    scores = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    scores[candidates] = sums[candidates] / max(count, 1)
    return scores


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest non-NaN scores (ties broken by lower index), ascending by score."""
    valid = [(float(s), i) for i, s in enumerate(scores.tolist()) if s == s]
    if k > len(valid):
        raise ValueError(f"cannot pick {k} blocks from {len(valid)} candidates")
    return [i for _, i in sorted(valid)[:k]]
