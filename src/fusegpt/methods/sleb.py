"""SLEB: iterative, drop the block whose removal keeps the calibration loss lowest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..importance import sleb_scores
from .block_scoring import (
    BlockPruneConfig,
    iterative_seconds,
    run_iterative,
    scoring_memory,
    with_linear_patch,
)
from .registry import Method, register


@dataclass
class SLEBConfig(BlockPruneConfig):
    """SLEB: every iteration removes the block whose absence gives the lowest calibration NLL.

    Barriers default to 1 as in SLEB's reference code. ``paper`` preset: 128 × 2048 calibration
    tokens (SLEB's); ``cpu``: 8 × 128 (every candidate also runs the LM head; measured to finish
    25% of the embedded SmolLM2-135M in under 15 minutes on 2 cores, benchmarks/RESULTS.md).
    """

    method: ClassVar[str] = "sleb"
    DEFAULTS: ClassVar[dict[str, Any]] = {"early_barrier": 1, "latter_barrier": 1}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 128, "seqlen": 2048},
                                                    "cpu": {"nsamples": 8, "seqlen": 128}}


register(Method(
    name="sleb",
    config_cls=SLEBConfig,
    run=with_linear_patch(lambda ctx, cfg, step: run_iterative(ctx, cfg, step, sleb_scores)),
    estimate_memory=lambda g, cfg, env: {"sleb": scoring_memory(g, cfg, env, logits=True)},
    estimate_time=lambda g, cfg, env: iterative_seconds(g, cfg, env, head=True),
    summary="SLEB: remove one block per iteration, the one whose removal keeps calibration NLL lowest",
    continues_smaller=True,
))
