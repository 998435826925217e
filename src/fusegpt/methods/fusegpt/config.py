"""Settings of FuseGPT and of its MI+FT ablation, with their ``paper`` and ``cpu`` presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...settings import check, check_bool, check_choice, check_float, check_int
from ..block_scoring import CPU_RANKING, BlockPruneConfig

GROUP_LOSSES = ("kl-batch", "mse", "cosine", "mse+cosine", "kl-logits")
AMP_DTYPES = ("auto", "bf16", "fp16", "fp32")
TRAININGS = ("stable", "paper")
SELECTIONS = ("mi", "fuse-trial")
# what ``training=paper`` turns off (unless set explicitly): the reference's plain procedure
PAPER_TRAINING = {"warmup": 0.0, "clip_grad": 0.0, "val_nsamples": 0, "keep_best": False, "sink_ratio": 0.0}

# Preset values; an explicit setting (Python field or --set) always wins.
GROUP_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # the paper / reference code: 32 × 2048 MI calibration, 128 × 2048 fine-tuning, 20 epochs
    "paper": dict(group_size=8, lora_rank=128, coef_rank=128, epochs=20, batch_size=8, lr_coef=1e-3,
                  lr_base=9.65e-6, lr=1e-3, loss="kl-batch", ft_nsamples=128, ft_seqlen=2048, max_terms=4,
                  nsamples=32, seqlen=2048),
    # embedded SmolLM2-135M on 2 CPU cores: sized from measured step times (7 blocks fwd+bwd on 8×256
    # tokens ≈ 2.2 s, one MI ranking on 8×256 ≈ 45 s) to remove 8 of 30 blocks in ~15 min; loss and
    # learning rates from the measurements in ALGORITHMS.md §2 (MSE beat the batch-softmax KL, LoRA
    # needs ~1e-3); results in benchmarks/results_fusegpt.md. Kept after the one-group study in
    # benchmarks/RESULTS.md §7 (block 17's group, 16 steps): MSE beat kl-batch and kl-logits (24.52
    # against 24.79 / 24.84 wiki perplexity), group 8 beat group 4 (24.79), the paper's LoRA rate
    # 9.65e-6 trains only the coefficients (25.01); lr_coef=1e-2 won on one group (24.39) but,
    # without sink damping, lost over a whole 25% run (45.19 against 44.11); 48 and 80 steps help
    # both methods alike; the stable defaults' sink damping (sink_ratio=10) took the 25% run to
    # 41.73 / 56.79. With it the larger rates hold over a whole run (2026-12-01, RESULTS.md §7, 25%):
    # FuseGPT lr_coef 1e-2 gave 39.12 / 53.34 against 41.73 / 56.79 at 1e-3, MI+FT lr 3e-3 gave
    # 40.62 / 55.73 against 42.38 / 57.41; without damping lr_coef 1e-2 blew groups up (45.19).
    "cpu": dict(group_size=8, lora_rank=32, coef_rank=32, epochs=4, batch_size=8, lr_coef=1e-2,
                lr_base=1e-3, lr=3e-3, loss="mse", ft_nsamples=32, ft_seqlen=256, max_terms=4, **CPU_RANKING),
}


@dataclass
class GroupTrainConfig(BlockPruneConfig):
    """Shared settings of FuseGPT and MI+FT: MI ranking, partial group, knowledge learning.

    Unset fields take the preset's value (``GROUP_TRAIN_PRESETS``); ``nsamples``/``seqlen`` size
    the MI ranking set, ``ft_*`` the fine-tuning set (``ft_source`` defaults to the calibration
    source, same seed). ``amp_dtype``: ``auto`` (the model's dtype, autocast on CUDA), ``bf16``,
    ``fp16``, ``fp32``. ``revert_if_worse``: after a group is trained, measure its loss again; if
    it is not below the loss before training, undo the training and keep the plain removal for
    that block (listed in the report's ``fallbacks``). Not in the paper (off by default);
    measured in benchmarks/RESULTS.md §2.

    Stable group training (on in both presets; ``training="paper"`` turns all five off, the
    reference's procedure): ``warmup`` (share of a group's steps with a linear learning-rate
    warm-up), ``clip_grad`` (max gradient norm), ``val_nsamples`` (held-in validation windows of
    the fine-tuning source, disjoint from the training windows, on which the group loss is
    measured before training and after every epoch) and ``keep_best`` (the group keeps its best
    validation epoch, "epoch 0" = untrained included, so no group ends worse than it started),
    and ``sink_ratio`` (below). Each can also be set alone.

    ``selection``: ``mi`` (the lowest MI, the paper) or ``fuse-trial`` (the reference code's
    ``--fuse-eval``: the ``trial_candidates`` lowest-MI blocks are each fused into their group and
    trained for ``trial_epochs`` at rank ``trial_rank``; the one whose fused model's last hidden
    state stays closest to the current model's (1 − cos, as MI) is removed).

    ``lora_restart``: before a group trains, fold the LoRA pairs its layers kept from earlier groups
    into their frozen weights and start fresh ones (B = 0), instead of continuing trained adapters
    with a fresh optimizer (measured in benchmarks/RESULTS.md §7).

    ``sink_ratio`` (10 by default, part of the stable training; 0 = off, and ``training="paper"``
    turns it off; not in the paper): in the group loss, tokens whose teacher norm exceeds
    ``sink_ratio`` × their window's median token norm (the attention-sink token) count relative to
    their size (``fusion.group_training.damp_sinks``). Chosen from benchmarks/RESULTS.md §7: at 25%
    of the embedded model it lowered FuseGPT from 44.11 / 60.63 to 41.73 / 56.79 (wiki / news) and
    MI+FT from 45.23 / 60.96 to 42.38 / 57.41, and the groups that train the blocks writing the
    sink stopped jumping in their first epoch.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"mi_batch_size": 1, "train_norms": True, "max_retries": 2,
                                          "retry_lr_factor": 0.1, "amp_dtype": "auto", "revert_if_worse": False,
                                          "training": "stable", "warmup": 0.1, "clip_grad": 1.0, "val_nsamples": 8,
                                          "keep_best": True, "selection": "mi", "trial_candidates": 4,
                                          "trial_epochs": 1, "trial_rank": 8,
                                          "lora_restart": False, "sink_ratio": 10.0}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = GROUP_TRAIN_PRESETS

    group_size: int | None = None
    lora_rank: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    ft_nsamples: int | None = None
    ft_seqlen: int | None = None
    ft_source: str | None = None
    mi_batch_size: int | None = None
    train_norms: bool | None = None
    max_retries: int | None = None
    retry_lr_factor: float | None = None
    amp_dtype: str | None = None
    revert_if_worse: bool | None = None
    training: str | None = None
    warmup: float | None = None
    clip_grad: float | None = None
    val_nsamples: int | None = None
    keep_best: bool | None = None
    selection: str | None = None
    trial_candidates: int | None = None
    trial_epochs: int | None = None
    trial_rank: int | None = None
    lora_restart: bool | None = None
    sink_ratio: float | None = None

    def validate(self) -> None:
        super().validate()
        for name in ("group_size", "epochs", "batch_size", "ft_nsamples", "mi_batch_size"):
            check_int(name, getattr(self, name))
        check_int("ft_seqlen", self.ft_seqlen, 2)
        check_int("lora_rank", self.lora_rank, 0)
        check_int("max_retries", self.max_retries, 0)
        check_choice("loss", self.loss, GROUP_LOSSES)
        check(self.retry_lr_factor is None or (isinstance(self.retry_lr_factor, (int, float))
                                               and 0 < self.retry_lr_factor < 1),
              f"retry_lr_factor must be in (0, 1), e.g. 0.1, got {self.retry_lr_factor!r}")
        check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        check_bool("train_norms", self.train_norms)
        check_bool("revert_if_worse", self.revert_if_worse)
        check_choice("training", self.training, TRAININGS)
        check_float("warmup", self.warmup, 0.0, 1.0)
        check_float("clip_grad", self.clip_grad)
        check_int("val_nsamples", self.val_nsamples, 0)
        check_bool("keep_best", self.keep_best)
        check_bool("lora_restart", self.lora_restart)
        check_float("sink_ratio", self.sink_ratio)
        check_choice("selection", self.selection, SELECTIONS)
        for name in ("trial_candidates", "trial_epochs", "trial_rank"):
            check_int(name, getattr(self, name))
        check(not (self.keep_best and self.val_nsamples == 0),
              "keep_best needs validation windows (val_nsamples >= 1); set keep_best=False or val_nsamples")

    def derive(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        super().derive(values, origins)
        if values.get("ft_source") is None:
            values["ft_source"] = values["calib_source"]
            origins["ft_source"] = "calib_source"
        if values.get("training") == "paper":
            for k, off in PAPER_TRAINING.items():
                if origins.get(k) != "explicit":
                    values[k], origins[k] = off, "training paper"


@dataclass
class FuseGPTConfig(GroupTrainConfig):
    """FuseGPT: MI ranking, fusion of the removed block into its partial group, knowledge learning.

    ``coef_rank``: rank of the fusion coefficients C·D; ``lora_rank``: LoRA on own weights;
    ``lr_coef``/``lr_base``: learning rates of the coefficients and of LoRA + norms (paper
    1e-3 / 9.65e-6); ``max_terms``: fused terms kept trainable per layer before older ones
    are merged into the frozen weight (memory; 0 = never merge).
    """

    method: ClassVar[str] = "fusegpt"
    coef_rank: int | None = None
    lr_coef: float | None = None
    lr_base: float | None = None
    max_terms: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int("coef_rank", self.coef_rank)
        check_float("lr_coef", self.lr_coef)
        check_float("lr_base", self.lr_base)
        check_int("max_terms", self.max_terms, 0)
