"""FuseGPT (learnable layers fusion): MI ranking, fusion into the partial group, group training."""

from __future__ import annotations

from ..block_scoring import with_linear_patch
from ..registry import Method, register
from .config import GROUP_TRAIN_PRESETS, FuseGPTConfig, GroupTrainConfig
from .estimates import group_memory, group_seconds
from .loop import merge_model, run_group_pruning


def group_method(name: str, config_cls: type[GroupTrainConfig], fuse: bool, summary: str) -> Method:
    """The record of a method run by the MI + group-training loop (with fusion or without)."""
    return Method(
        name=name,
        config_cls=config_cls,
        run=with_linear_patch(lambda ctx, cfg, step: run_group_pruning(ctx, cfg, step, fuse=fuse)),
        estimate_memory=lambda g, cfg, env: group_memory(g, cfg, env, fuse=fuse),
        estimate_time=lambda g, cfg, env: group_seconds(g, cfg, env, fuse=fuse),
        summary=summary,
        resumable=True,
    )


register(group_method("fusegpt", FuseGPTConfig, fuse=True, summary="FuseGPT: fuse each block of least Macro "
                      "Influence into its neighbours, train the group, drop it"))

__all__ = ["GROUP_TRAIN_PRESETS", "FuseGPTConfig", "GroupTrainConfig", "group_method", "merge_model",
           "run_group_pruning"]
