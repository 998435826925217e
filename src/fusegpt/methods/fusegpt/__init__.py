"""FuseGPT (learnable layers fusion): MI ranking, fusion into the partial group, group training."""

from __future__ import annotations

from ..registry import Method, register
from .config import GROUP_TRAIN_PRESETS, FuseGPTConfig, GroupTrainConfig
from .estimates import group_memory, group_seconds
from .loop import merge_model, run_group_pruning

register(Method(
    name="fusegpt",
    config_cls=FuseGPTConfig,
    run=lambda ctx, cfg, step: run_group_pruning(ctx, cfg, step, fuse=True),
    estimate_memory=lambda g, cfg, env: group_memory(g, cfg, env, fuse=True),
    estimate_time=lambda g, cfg, env: group_seconds(g, cfg, env, fuse=True),
    summary="FuseGPT: fuse each block of least Macro Influence into its neighbours, train the group, drop it",
    resumable=True,
))

__all__ = ["GROUP_TRAIN_PRESETS", "FuseGPTConfig", "GroupTrainConfig", "merge_model", "run_group_pruning"]
