"""MI + FT, FuseGPT's ablation: the same MI ranking and group training, without fusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..settings import setting
from .fusegpt import group_method
from .fusegpt.config import GroupTrainConfig
from .registry import register


@dataclass
class MIFTConfig(GroupTrainConfig):
    """MI + FT: MI ranking, drop, then train the same group with the same loss, LoRA and norms only
    (no fusion), at its own learning rate ``lr`` (default 1e-3, tuned on the embedded model; at
    the paper's 9.65e-6 plain fine-tuning barely moves).
    """

    method: ClassVar[str] = "mi+ft"
    lr: float | None = setting("float", "learning rate of the group's LoRA and norms", low=0.0)

    def rates(self) -> tuple[float, float]:
        return 0.0, self.lr


register(group_method("mi+ft", MIFTConfig, fuse=False, summary="MI + FT: FuseGPT's loop without fusion (drop, "
                      "then fine-tune the group's LoRA and norms)"))
