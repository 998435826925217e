"""MI (FuseGPT's Macro Influence), iterative, drop only (the paper's "MI" ablation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..importance import mi_scores
from .block_scoring import (
    BlockPruneConfig,
    iterative_seconds,
    run_iterative,
    scoring_memory,
    with_linear_patch,
)
from .registry import Method, register


@dataclass
class MIConfig(BlockPruneConfig):
    """MI: every iteration removes the block whose absence changes the last hidden state least
    (1 − mean cos(X_L, X_L without i)). ``paper``: 32 × 2048 calibration; ``cpu``: 8 × 256."""

    method: ClassVar[str] = "mi"


register(Method(
    name="mi",
    config_cls=MIConfig,
    run=with_linear_patch(lambda ctx, cfg, step: run_iterative(ctx, cfg, step, mi_scores)),
    estimate_memory=lambda g, cfg, env: {"mi": scoring_memory(g, cfg, env)},
    estimate_time=lambda g, cfg, env: iterative_seconds(g, cfg, env),
    summary="MI: remove one block per iteration by Macro Influence, no training (FuseGPT's ablation)",
    continues_smaller=True,
))
