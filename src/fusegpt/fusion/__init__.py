"""Learnable layers fusion: fused linear layers (W + BA + Σ (C·D) ⊙ W_p) and group training."""

from .fused_linear import FusedLinear, FusionTerm, frozen_weight, fused_roles, merge_fused
from .group_training import (
    LOSSES,
    GroupResult,
    TrainResult,
    TrainSettings,
    eval_loss,
    group_window,
    kl_batch_loss,
    make_loss,
    run_group,
    train_group,
)

__all__ = ["LOSSES", "GroupResult", "FusedLinear", "FusionTerm", "TrainResult", "TrainSettings", "eval_loss", "frozen_weight", "fused_roles",
           "group_window", "kl_batch_loss", "make_loss", "merge_fused", "run_group", "train_group"]
