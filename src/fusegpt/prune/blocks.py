"""Removing whole blocks, and the block-pruning methods built on the scorers.

``remove_blocks`` only cuts; the scorers in :mod:`fusegpt.importance` only score. The runner
here alternates them: one-shot for ShortGPT, one block per iteration for SLEB and MI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..config import BlockPruneConfig
from ..importance import bi_scores, candidate_blocks, lowest, mi_scores, sleb_scores
from ..models import DecoderAdapter
from ..report import StepReport

logger = logging.getLogger(__name__)


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


def run_block_pruning(adapter: DecoderAdapter, calib: torch.Tensor, cfg: BlockPruneConfig, step: StepReport,
                      batch_size: int = 1) -> None:
    """ShortGPT (one shot, BI), SLEB or MI (iterative): remove ceil(L·s) blocks in place."""
    n_layers = adapter.num_layers
    k = n_layers - cfg.plan_layers(n_layers)
    if cfg.method == "shortgpt":
        scores = bi_scores(adapter, calib, batch_size)
        cands = candidate_blocks(adapter.num_layers, cfg.early_barrier, cfg.latter_barrier)
        masked = torch.full_like(scores, float("nan"))
        masked[cands] = scores[cands]
        chosen = lowest(masked, k)
        step.add_iteration(scores_by_origin(adapter, masked), remove_blocks(adapter, chosen))
        logger.info("shortgpt removed blocks %s", step.removed)
        return
    scorer = {"sleb": sleb_scores, "mi": mi_scores}[cfg.method]
    for _ in tqdm(range(k), desc=f"{cfg.method} blocks", unit="block"):
        cands = candidate_blocks(adapter.num_layers, cfg.early_barrier, cfg.latter_barrier)
        scores = scorer(adapter, calib, cands, batch_size)
        chosen = lowest(scores, 1)
        step.add_iteration(scores_by_origin(adapter, scores), remove_blocks(adapter, chosen))
        logger.info("%s removed block %d (original index)", cfg.method, step.removed[-1])
