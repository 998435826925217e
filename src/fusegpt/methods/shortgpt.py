"""ShortGPT: one-shot Block Influence ranking, drop the k lowest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..importance import bi_scores
from ..timing import block_flops, seconds
from .block_scoring import BlockPruneConfig, run_one_shot, scoring_memory, with_linear_patch
from .registry import Method, register


@dataclass
class ShortGPTConfig(BlockPruneConfig):
    """ShortGPT: BI = 1 − mean cos(X_i, X_{i+1}) on the calibration set; the k lowest go at once."""

    method: ClassVar[str] = "shortgpt"


register(Method(
    name="shortgpt",
    config_cls=ShortGPTConfig,
    run=with_linear_patch(lambda ctx, cfg, step: run_one_shot(ctx, cfg, step, lambda a, calib, bs: bi_scores(a, calib, bs))),
    estimate_memory=lambda g, cfg, env: {"shortgpt": scoring_memory(g, cfg, env)},
    estimate_time=lambda g, cfg, env: seconds(g.n_layers * block_flops(g, cfg.nsamples * cfg.seqlen, cfg.seqlen), env),
    summary="ShortGPT: drop the k blocks of lowest Block Influence, one shot",
))
