"""What the score-then-drop methods share: their config, their runner, their estimates.

ShortGPT ranks once (Block Influence) and drops the k lowest; SLEB and MI re-rank the current
model every iteration and drop one block each time. Scorers (:mod:`fusegpt.importance`) only
score; :func:`fusegpt.blocks.remove_blocks` only cuts; the runners here alternate them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..blocks import remove_blocks, scores_by_origin
from ..data import calibration_windows
from ..importance import candidate_blocks, lowest
from ..linear_map import SOLVERS, check_map_tokens, contiguous_runs, fit_spans, fold_into_predecessor
from ..memory import EstimateEnv, ModelGeometry, act_bytes
from ..models import DecoderAdapter
from ..report import StepReport
from ..runstate import RunContext
from ..settings import PruneConfig, blocks_to_remove, check, setting
from ..timing import block_flops, head_flops, seconds

logger = logging.getLogger(__name__)

Scorer = Callable[[DecoderAdapter, torch.Tensor, list[int], int], torch.Tensor]

LINEAR_FOLDS = ("none", *SOLVERS)
# windows the linear_fold maps are fitted on, per preset (ReplaceMe's own calibration sizes)
FOLD_WINDOWS = {"paper": {"fold_nsamples": 256, "fold_seqlen": 1024}, "cpu": {"fold_nsamples": 64, "fold_seqlen": 256}}
# windows LinearPatch's scales come from: the reference's 128 × 2048; on a CPU 64 × 256
PATCH_WINDOWS = {"paper": {"patch_nsamples": 128, "patch_seqlen": 2048},
                 "cpu": {"patch_nsamples": 64, "patch_seqlen": 256}}

# The ranking set of the ``cpu`` presets: 8 windows of 256 wiki tokens, the same for every block
# method (and FuseGPT's MI ranking), so they compare on the same data. SLEB, whose every
# candidate also pays the LM head, gets 8 × 128 to finish in under 15 minutes on 2 cores.
CPU_RANKING = {"nsamples": 8, "seqlen": 256}


@dataclass
class BlockPruneConfig(PruneConfig):
    """Block (depth) pruning by an importance score; subclasses name the score.

    ``early_barrier``/``latter_barrier``: how many first/last blocks are never candidates.
    ``linear_fold`` (not in any paper; ``none`` by default): before each removal, fit ReplaceMe's
    linear map for every run of removed blocks on the model as it is at that step (``ls``: least
    squares, ``cosine``: the cosine variant) and fold it into the block before the run
    (:mod:`fusegpt.linear_map`); a run that starts at block 0 has no predecessor and is removed
    as is. The maps are fitted on their own windows of the calibration source (same seed):
    ``fold_nsamples`` × ``fold_seqlen``, by default :data:`FOLD_WINDOWS` of the preset (a
    d × d map needs many more tokens than a ranking: on the embedded model 8 × 128 tokens overfit
    it, 64 × 256 do not); FuseGPT and MI+FT fold after the group's teacher outputs are taken and
    before its training. Why ``none`` stays the default (RESULTS.md §9, embedded model, 25%):
    it lifts ShortGPT (72.3 → 46.3 ``wiki`` perplexity) but hurts FuseGPT (44.1 → 45.8), and the
    papers' methods should run as published unless asked.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"early_barrier": 0, "latter_barrier": 0, "linear_fold": "none",
                                          "linear_patch": False}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 32, "seqlen": 2048},
                                                    "cpu": dict(CPU_RANKING)}

    early_barrier: int | None = setting("int", "first blocks that are never candidates", low=0)
    latter_barrier: int | None = setting("int", "last blocks that are never candidates", low=0)
    linear_fold: str | None = setting("choice", "before each removal, fold a fitted linear map of the removed run "
                                      "into the block before it (ls, cosine; none = off; not in any paper)",
                                      choices=LINEAR_FOLDS)
    fold_nsamples: int | None = setting("int", "windows the linear_fold maps are fitted on", low=1)
    fold_seqlen: int | None = setting("int", "tokens per linear_fold window", low=2)
    linear_patch: bool | None = setting("bool", "after the removals, LinearPatch: a Hadamard-rotated channel scaling "
                                        "H·diag(d)·Hᵀ on the stream after each removed run (training-free; saved "
                                        "as a load_pruned checkpoint)")
    patch_nsamples: int | None = setting("int", "windows LinearPatch's scales are measured on", low=1)
    patch_seqlen: int | None = setting("int", "tokens per LinearPatch window", low=2)

    def windows(self) -> list[tuple[str, int, str]]:
        out = super().windows()
        if self.linear_fold not in (None, "none"):
            out.append((self.calib_source, self.fold_nsamples * self.fold_seqlen, "fold_nsamples × fold_seqlen"))
        if self.linear_patch:
            out.append((self.calib_source, self.patch_nsamples * self.patch_seqlen, "patch_nsamples × patch_seqlen"))
        return out

    def plan_placement(self, offload: bool, device_type: str) -> None:
        super().plan_placement(offload, device_type)
        check(not (offload and self.linear_patch), "linear_patch does not run layer-wise (--offload) yet; run resident")

    def plan_model(self, geometry) -> None:
        super().plan_model(geometry)
        if self.linear_fold not in (None, "none"):
            check(geometry.residual_down_proj, "linear_fold folds a map into the block before a removed run, which "
                  "needs a block output of the form input + down_proj(…); this family has a norm after the FFN")
            check_map_tokens(self.fold_nsamples * self.fold_seqlen, geometry.hidden, 0.0, "linear_fold",
                             "fold_nsamples × fold_seqlen")

    def derive(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        super().derive(values, origins)
        for key in ("fold_nsamples", "fold_seqlen"):
            if values.get(key) is None:
                values[key] = FOLD_WINDOWS[values["preset"]][key]
                origins[key] = f"preset {values['preset']} (fold windows)"
        for key in ("patch_nsamples", "patch_seqlen"):
            if values.get(key) is None:
                values[key] = PATCH_WINDOWS[values["preset"]][key]
                origins[key] = f"preset {values['preset']} (patch windows)"

    def plan_layers(self, n_layers: int) -> int:
        k = blocks_to_remove(n_layers, self.sparsity)
        n_cand = n_layers - self.early_barrier - self.latter_barrier
        check(k < n_layers, f"sparsity {self.sparsity} removes all {n_layers} blocks; choose a smaller sparsity")
        check(k <= n_cand, f"sparsity {self.sparsity} needs {k} blocks but only {n_cand} are candidates "
              f"(barriers {self.early_barrier}+{self.latter_barrier}); lower the sparsity or the barriers")
        return n_layers - k


def with_linear_patch(run: Callable[[RunContext, Any, StepReport], None]) -> Callable[[RunContext, Any, StepReport], None]:
    """A depth method's runner, followed by LinearPatch when ``cfg.linear_patch``: the statistics of every
    block boundary are taken on the model before the step, the patches placed after its removals
    (:mod:`fusegpt.linear_patch`); the step's details list them under ``linear_patch``."""

    def patched(ctx: RunContext, cfg, step: StepReport) -> None:
        if not getattr(cfg, "linear_patch", False):
            run(ctx, cfg, step)
            return
        from ..linear_patch import apply_patches, boundary_stats, rotation

        adapter = ctx.adapter
        windows = calibration_windows(ctx.tokenizer, cfg.calib_source, cfg.patch_nsamples, cfg.patch_seqlen, cfg.seed)
        R, kind = rotation(adapter.config.hidden_size, cfg.seed)
        origin = adapter.origin
        stats = boundary_stats(adapter, windows, R)
        removed_before = len(step.removed)
        run(ctx, cfg, step)
        step.details["linear_patch"] = apply_patches(adapter, origin, step.removed[removed_before:], stats, R, kind)

    return patched


def calibration_for(ctx: RunContext, cfg: PruneConfig) -> torch.Tensor:
    c = cfg.calib
    return calibration_windows(ctx.tokenizer, c.source, c.nsamples, c.seqlen, c.seed)


def fold_windows(ctx: RunContext, cfg: BlockPruneConfig) -> torch.Tensor | None:
    """The windows ``linear_fold`` fits its maps on (None when it is off)."""
    if cfg.linear_fold == "none":
        return None
    return calibration_windows(ctx.tokenizer, cfg.calib_source, cfg.fold_nsamples, cfg.fold_seqlen, cfg.seed)


def fold_before_removal(adapter: DecoderAdapter, cfg: BlockPruneConfig, windows: torch.Tensor | None,
                        indices: list[int]) -> list[dict[str, Any]]:
    """With ``cfg.linear_fold``, fit and fold a linear map for each run of ``indices`` (current
    indices, about to be removed) into the block before it; returns what each fit did."""
    if cfg.linear_fold == "none" or windows is None:
        return []
    origin = adapter.origin
    runs = contiguous_runs(indices)
    out = [{"blocks": [origin[i] for i in range(s, e)], "folded": False} for s, e in runs if s == 0]
    runs = [(s, e) for s, e in runs if s > 0]
    for fit in fit_spans(adapter, windows, runs, solver=cfg.linear_fold, seed=cfg.seed) if runs else []:
        fold_into_predecessor(adapter, fit.start - 1, fit.transform)
        out.append({"blocks": [origin[i] for i in range(fit.start, fit.end)], "folded": True,
                    "into": origin[fit.start - 1], "residual": fit.residual,
                    "residual_without_map": fit.residual_identity})
    for o in out:
        logger.info("linear fold: %s", o)
    return out


def run_one_shot(ctx: RunContext, cfg: BlockPruneConfig, step: StepReport, scorer, batch_size: int = 1) -> None:
    """Score once, drop the k lowest candidates."""
    adapter = ctx.adapter
    k = adapter.num_layers - cfg.plan_layers(adapter.num_layers)
    calib = calibration_for(ctx, cfg)
    scores = scorer(adapter, calib, batch_size)
    cands = candidate_blocks(adapter.num_layers, cfg.early_barrier, cfg.latter_barrier)
    masked = torch.full_like(scores, float("nan"))
    masked[cands] = scores[cands]
    drop = lowest(masked, k)
    folds = fold_before_removal(adapter, cfg, fold_windows(ctx, cfg), drop)
    by_origin = scores_by_origin(adapter, masked)
    step.add_iteration(by_origin, remove_blocks(adapter, drop), **({"linear_fold": folds} if folds else {}))
    logger.info("%s removed blocks %s", cfg.method, step.removed)


def run_iterative(ctx: RunContext, cfg: BlockPruneConfig, step: StepReport, scorer: Scorer,
                  batch_size: int = 1) -> None:
    """Re-score the current model and drop its lowest block, ceil(L·s) times."""
    adapter = ctx.adapter
    k = adapter.num_layers - cfg.plan_layers(adapter.num_layers)
    calib = calibration_for(ctx, cfg)
    fold_set = fold_windows(ctx, cfg)
    for _ in tqdm(range(k), desc=f"{cfg.method} blocks", unit="block"):
        cands = candidate_blocks(adapter.num_layers, cfg.early_barrier, cfg.latter_barrier)
        scores = scorer(adapter, calib, cands, batch_size)
        drop = lowest(scores, 1)
        folds = fold_before_removal(adapter, cfg, fold_set, drop)
        by_origin = scores_by_origin(adapter, scores)
        step.add_iteration(by_origin, remove_blocks(adapter, drop), **({"linear_fold": folds} if folds else {}))
        logger.info("%s removed block %d (original index)", cfg.method, step.removed[-1])


# ---------------------------------------------------------------------------- estimates
def scoring_memory(g: ModelGeometry, cfg: PruneConfig, env: EstimateEnv, logits: bool = False,
                   batch: int = 1) -> dict[str, int]:
    """States entering every block for one batch, one block's activations (+ fp32 logits)."""
    t = cfg.seqlen
    parts = {"resident blocks": env.resident_block(g),
             "cached states": (g.n_layers + 1) * batch * t * g.hidden * env.nbytes,
             "activations": act_bytes(g, batch, t, env.nbytes, scores=env.scores)}
    if logits:
        parts["logits"] = batch * t * g.vocab * 4
    return parts


def iterative_flops(g: ModelGeometry, cfg: BlockPruneConfig, n_layers: int, k: int, head: bool) -> float:
    """Block passes of ``k`` skip-one rankings with cached prefixes (L + Σ_c (L−1−c) per ranking)."""
    tokens = cfg.nsamples * cfg.seqlen
    blk = block_flops(g, tokens, cfg.seqlen)
    total = 0.0
    for it in range(k):
        n = n_layers - it
        cands = candidate_blocks(n, cfg.early_barrier, cfg.latter_barrier)
        total += blk * (n + sum(n - 1 - c for c in cands))
        if head:
            total += head_flops(g, tokens) * len(cands)
    return total


def iterative_seconds(g: ModelGeometry, cfg: BlockPruneConfig, env: EstimateEnv, head: bool = False) -> float:
    k = blocks_to_remove(g.n_layers, cfg.sparsity)
    return seconds(iterative_flops(g, cfg, g.n_layers, k, head), env)
