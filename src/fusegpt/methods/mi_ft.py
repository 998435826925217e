"""MI + FT, FuseGPT's ablation: the same MI ranking and group training, without fusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..settings import check_float
from .fusegpt.config import GroupTrainConfig
from .fusegpt.estimates import group_memory, group_seconds
from .fusegpt.loop import run_group_pruning
from .registry import Method, register


@dataclass
class MIFTConfig(GroupTrainConfig):
    """MI + FT: MI ranking, drop, then train the same group with the same loss, LoRA and norms only
    (no fusion), at its own learning rate ``lr`` (default 1e-3, tuned on the embedded model; at
    the paper's 9.65e-6 plain fine-tuning barely moves).
    """

    method: ClassVar[str] = "mi+ft"
    lr: float | None = None

    def validate(self) -> None:
        super().validate()
        check_float("lr", self.lr)


register(Method(
    name="mi+ft",
    config_cls=MIFTConfig,
    run=lambda ctx, cfg, step: run_group_pruning(ctx, cfg, step, fuse=False),
    estimate_memory=lambda g, cfg, env: group_memory(g, cfg, env, fuse=False),
    estimate_time=lambda g, cfg, env: group_seconds(g, cfg, env, fuse=False),
    summary="MI + FT: FuseGPT's loop without fusion (drop, then fine-tune the group's LoRA and norms)",
    resumable=True,
))
