"""ReplaceMe (Shopkhoev et al., NeurIPS 2025): replace the most redundant span of blocks by one
linear map, estimated on calibration activations and folded into the block before the span.
Training-free; the output is a stock checkpoint with fewer blocks and no new parameters.

Choices (the reference, mts-ai/ReplaceMe, where the paper is silent; :mod:`fusegpt.linear_map`
for the maths):

* the k = ceil(L·s) blocks go in ``spans`` contiguous spans of near-equal length (the reference's
  ``num_A``; lengths differ by at most one); each length's spans are ranked by the angular distance
  between the states entering and leaving them, and taken greedily, lowest first, without
  overlap; spans that end up adjacent are merged into one span with one map (the reference's
  ``merge_consecutive``). A span never starts at block 0 (its map needs a predecessor);
* ``distance_tokens``: ``all`` calibration tokens (default; with a few windows on a CPU the
  reference's ``last`` token of each window gives only ``nsamples`` samples) or ``last``;
* ``solver``: ``ls`` (least squares in fp64, optional ``ridge`` relative to the mean diagonal of
  MᵀM; the paper's default and ours) or
  ``cosine`` (Adam on 1 − cos from ``T = I``: ``cosine_lr`` 1e-4, ``cosine_epochs`` 10,
  ``cosine_batch`` 1,024 tokens as the reference; ``cosine_init=ls`` starts from the least-squares
  map instead, not in the paper);
* ``solver=identity``: no map, the span is just removed (the ablation that shows what the map is
  worth);
* every span is fitted on the model as it is before any removal, in one pass (as the reference);
* ``span_choice``: ``distance`` (the paper's angular distance, default) or ``residual`` (not in the
  paper): rank every candidate span by the relative residual of its own least-squares fit
  (:func:`fusegpt.linear_map.span_residuals`, one pass, hidden² fp64 sums per candidate). The
  angular distance averages over tokens and barely sees the one token per window that carries a
  model's attention sink, so on the embedded model it picks a span starting at the block that
  writes the sink (blocks 11–18, residual 0.26; RESULTS.md §9); the residual sees it.

Presets: ``paper`` 256 × 1024 calibration tokens (the reference uses 8,000 short chat samples of
≤1,024 tokens; every window's states are kept between blocks, so this is sized to fit beside an
8B model on one GPU); ``cpu`` 64 × 256 (a minute on 2 cores for the embedded model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..blocks import remove_blocks
from ..linear_map import (
    SOLVERS,
    check_map_tokens,
    contiguous_runs,
    fit_spans,
    fold_into_predecessor,
    span_distances,
    span_residuals,
)
from ..memory import EstimateEnv, ModelGeometry, act_bytes
from ..report import StepReport
from ..runstate import RunContext
from ..settings import ConfigError, blocks_to_remove, check, setting
from ..timing import block_flops, seconds
from .block_scoring import BlockPruneConfig, calibration_for, with_linear_patch
from .registry import Method, register

logger = logging.getLogger(__name__)

SPAN_CHOICES = ("distance", "residual")


@dataclass
class ReplaceMeConfig(BlockPruneConfig):
    """ReplaceMe: remove ``spans`` spans of contiguous blocks, each replaced by a fitted linear map."""

    method: ClassVar[str] = "replaceme"
    DEFAULTS: ClassVar[dict[str, Any]] = {"spans": 1, "solver": "ls", "ridge": 0.0, "distance_tokens": "all",
                                          "span_choice": "distance",
                                          "cosine_epochs": 10, "cosine_lr": 1e-4, "cosine_batch": 1024,
                                          "cosine_init": "identity"}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 256, "seqlen": 1024},
                                                    "cpu": {"nsamples": 64, "seqlen": 256}}

    spans: int | None = setting("int", "spans of contiguous blocks removed (near-equal lengths; adjacent ones merge)",
                                low=1)
    span_choice: str | None = setting("choice", "distance (the paper's angular distance) or residual (each "
                                      "candidate's own least-squares fit; not in the paper)", choices=SPAN_CHOICES)
    solver: str | None = setting("choice", "ls (least squares, fp64), cosine (Adam on 1 - cos) or identity (no map)",
                                 choices=(*SOLVERS, "identity"))
    ridge: float | None = setting("float", "ridge of the least-squares fit, relative to the mean diagonal of MᵀM",
                                  low=0.0)
    distance_tokens: str | None = setting("choice", "tokens the distances average over: all, or each window's last",
                                          choices=("all", "last"))
    cosine_epochs: int | None = setting("int", "cosine solver: epochs", low=1)
    cosine_lr: float | None = setting("float", "cosine solver: Adam learning rate", low=0.0, open_low=True)
    cosine_batch: int | None = setting("int", "cosine solver: tokens per step", low=1)
    cosine_init: str | None = setting("choice", "cosine solver: start from identity or from the ls map",
                                      choices=("identity", "ls"))

    def check_across(self) -> None:
        super().check_across()
        check(self.linear_fold in (None, "none"), "replaceme always fits a linear map; choose it with solver=ls|cosine, "
              "not linear_fold")

    def plan_model(self, geometry) -> None:
        super().plan_model(geometry)
        check(self.solver == "identity" or geometry.residual_down_proj,
              "replaceme folds its map into the block before the span, which needs a block output of the form "
              "input + down_proj(…); this family (Gemma 2/3) has a norm after the FFN: use another depth method, "
              "or --set solver=identity (no map)")
        if self.solver == "ls" or (self.solver == "cosine" and self.cosine_init == "ls"):
            check_map_tokens(self.nsamples * self.seqlen, geometry.hidden, self.ridge, "replaceme",
                             "nsamples × seqlen")

    def plan_layers(self, n_layers: int) -> int:
        left = super().plan_layers(n_layers)
        k = n_layers - left
        check(self.spans is None or self.spans <= k, f"spans={self.spans} but sparsity {self.sparsity} removes only "
              f"{k} blocks; use at most {k} spans")
        first = max(1, self.early_barrier or 0)
        room = n_layers - (self.latter_barrier or 0) - first
        check(k <= room, f"{k} blocks to replace but only {room} can be (block 0 is never replaced: its map needs a "
              "predecessor); lower the sparsity or the barriers")
        return left


def span_lengths(k: int, spans: int) -> list[int]:
    """``k`` blocks in ``spans`` near-equal spans, longest first: (8, 3) → [3, 3, 2]."""
    return [k // spans + (1 if i < k % spans else 0) for i in range(spans)]


def choose_spans(distances: dict[int, torch.Tensor], lengths: list[int], first: int, stop: int) -> list[tuple[int, int]]:
    """Greedy non-overlapping spans ``[s, s+n)`` inside ``[first, stop)``, lowest distance first."""
    used: set[int] = set()
    chosen: list[tuple[int, int]] = []
    for n in lengths:
        order = sorted(range(first, stop - n + 1), key=lambda s: float(distances[n][s]))
        pick = next((s for s in order if not used & set(range(s, s + n))), None)
        if pick is None:
            raise ConfigError(f"no room for another span of {n} blocks between blocks {first} and {stop - 1}; "
                              "use fewer spans or a lower sparsity")
        chosen.append((pick, pick + n))
        used |= set(range(pick, pick + n))
    return sorted(chosen)


def replace_spans(ctx: RunContext, cfg: ReplaceMeConfig, step: StepReport) -> None:
    """Choose the spans, fit and fold their maps on the current model, then remove them."""
    adapter = ctx.adapter
    n_layers = adapter.num_layers
    k = blocks_to_remove(n_layers, cfg.sparsity)
    calib = calibration_for(ctx, cfg)
    lengths = span_lengths(k, cfg.spans)
    if cfg.span_choice == "residual":
        dist = span_residuals(adapter, calib, lengths, ridge=cfg.ridge)
    else:
        dist = span_distances(adapter, calib, lengths, last_token=cfg.distance_tokens == "last")
    first, stop = max(1, cfg.early_barrier), n_layers - cfg.latter_barrier
    runs = contiguous_runs([i for s, e in choose_spans(dist, lengths, first, stop) for i in range(s, e)])
    fits = fit_spans(adapter, calib, runs, solver=cfg.solver, ridge=cfg.ridge, cosine_epochs=cfg.cosine_epochs,
                     cosine_lr=cfg.cosine_lr, cosine_batch=cfg.cosine_batch, cosine_init=cfg.cosine_init,
                     seed=cfg.seed)
    origin = adapter.origin
    spans_info = []
    for fit in fits:
        if cfg.solver != "identity":
            fold_into_predecessor(adapter, fit.start - 1, fit.transform)
        n = fit.end - fit.start  # a merged span has no row in the selection table: the fit measured it
        d = dist[n][fit.start] if n in dist and cfg.span_choice == "distance" else fit.distance
        spans_info.append({"blocks": [origin[i] for i in range(fit.start, fit.end)], "into": origin[fit.start - 1],
                           "distance": float(d), "residual": fit.residual,
                           "residual_without_map": fit.residual_identity, **fit.info})
        logger.info("replaceme: blocks %s -> linear map in block %d's down projection (distance %.4f, residual "
                    "%.4f; %.4f without the map)", spans_info[-1]["blocks"], spans_info[-1]["into"], float(d),
                    fit.residual, fit.residual_identity)
    scores = {origin[s]: float(v) for s, v in enumerate(dist[lengths[0]].tolist()) if v != float("inf")}
    removed = remove_blocks(adapter, [i for fit in fits for i in range(fit.start, fit.end)])
    step.add_iteration(scores, removed)
    step.details["spans"] = spans_info
    step.details["solver"] = cfg.solver
    step.details["span_choice"] = cfg.span_choice


def _time(g: ModelGeometry, cfg: ReplaceMeConfig, env: EstimateEnv) -> float:
    tokens = cfg.nsamples * cfg.seqlen
    blk = block_flops(g, tokens, cfg.seqlen)
    solve = 2 * tokens * g.hidden * g.hidden * 2 + g.hidden ** 3  # MᵀM, Mᵀ(L−Y), the solve
    return seconds(2 * g.n_layers * blk + solve, env)


def _memory(g: ModelGeometry, cfg: ReplaceMeConfig, env: EstimateEnv) -> dict[str, dict[str, int]]:
    tokens = cfg.nsamples * cfg.seqlen
    parts = {"resident blocks": env.resident_block(g),
             "window states (all windows, between blocks)": tokens * g.hidden * env.nbytes,
             "activations": act_bytes(g, 1, cfg.seqlen, env.nbytes, scores=env.scores)}
    parts["span states (M, Y)"] = 2 * tokens * g.hidden * env.nbytes
    parts["normal equations (fp64)"] = 2 * g.hidden * g.hidden * 8
    if cfg.solver == "cosine":
        parts["cosine rows (fp32)"] = 3 * tokens * g.hidden * 4
    return {"replaceme": parts}


register(Method(
    name="replaceme",
    config_cls=ReplaceMeConfig,
    run=with_linear_patch(replace_spans),
    estimate_memory=_memory,
    estimate_time=_time,
    summary="ReplaceMe: replace the most redundant span(s) of blocks by a least-squares linear map, training-free",
))
