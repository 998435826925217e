"""Settings of FuseGPT and of its MI+FT ablation, with their ``paper`` and ``cpu`` presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...settings import check, setting
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

    group_size: int | None = setting("int", "blocks in the partial group, the removed one included (4 before it, "
                                     "3 after)", low=1)
    lora_rank: int | None = setting("int", "LoRA rank on the group's own weights (0 = no LoRA)", low=0)
    epochs: int | None = setting("int", "passes over the fine-tuning windows per group", low=1)
    batch_size: int | None = setting("int", "fine-tuning windows per step", low=1)
    loss: str | None = setting("choice", "group loss: kl-batch (the paper's softmax over the batch), mse, cosine, "
                               "mse+cosine, kl-logits", choices=GROUP_LOSSES)
    ft_nsamples: int | None = setting("int", "fine-tuning windows", low=1)
    ft_seqlen: int | None = setting("int", "tokens per fine-tuning window", low=2)
    ft_source: str | None = setting("str", "fine-tuning text (default: the calibration source)")
    mi_batch_size: int | None = setting("int", "ranking windows per forward", low=1)
    train_norms: bool | None = setting("bool", "train the group's norm weights too")
    max_retries: int | None = setting("int", "retries of a diverged group at lower learning rates", low=0)
    retry_lr_factor: float | None = setting("float", "learning-rate factor of each retry", low=0.0, high=1.0,
                                            open_low=True, open_high=True, hint="e.g. 0.1")
    amp_dtype: str | None = setting("choice", "autocast dtype on CUDA (auto = the model's)", choices=AMP_DTYPES)
    revert_if_worse: bool | None = setting("bool", "undo a group whose training loss did not fall (not in the paper)")
    training: str | None = setting("choice", "stable (warm-up, clipping, validation, best epoch, sink damping) or "
                                   "paper (the reference's plain procedure)", choices=TRAININGS)
    warmup: float | None = setting("float", "share of a group's steps with a linear learning-rate warm-up",
                                   low=0.0, high=1.0)
    clip_grad: float | None = setting("float", "gradient norm clip (0 = off)", low=0.0)
    val_nsamples: int | None = setting("int", "held-in validation windows per group (0 = none)", low=0)
    keep_best: bool | None = setting("bool", "keep the group's best validation epoch (epoch 0 = untrained counts)")
    selection: str | None = setting("choice", "mi (lowest Macro Influence) or fuse-trial (trial-fuse the lowest "
                                    "candidates, keep the best)", choices=SELECTIONS)
    trial_candidates: int | None = setting("int", "fuse-trial: candidates tried per iteration", low=1)
    trial_epochs: int | None = setting("int", "fuse-trial: epochs of each trial", low=1)
    trial_rank: int | None = setting("int", "fuse-trial: LoRA / coefficient rank of the trials", low=1)
    lora_restart: bool | None = setting("bool", "fold earlier groups' LoRA into the weights and start fresh pairs")
    sink_ratio: float | None = setting("float", "damp tokens whose teacher norm is above this many times the "
                                       "window's median (the attention sink; 0 = off)", low=0.0)

    def check_across(self) -> None:
        super().check_across()
        check(not (self.keep_best and self.val_nsamples == 0),
              "keep_best needs validation windows (val_nsamples >= 1); set keep_best=False or val_nsamples")

    def plan_placement(self, offload: bool, device_type: str) -> None:
        super().plan_placement(offload, device_type)
        check(not (offload and self.selection == "fuse-trial"),
              "selection=fuse-trial does not run layer-wise (--offload) yet; use selection=mi, or run resident")

    def rates(self) -> tuple[float, float]:
        """``(coefficient rate, LoRA-and-norm rate)`` of group training (the subclass says which setting)."""
        raise NotImplementedError

    def fusion(self) -> tuple[int, int]:
        """``(coefficient rank, max_terms)`` of the fused terms; ``(0, 0)`` when the method does not fuse."""
        return 0, 0

    def windows(self) -> list[tuple[str, int, str]]:
        out = super().windows() + [(self.ft_source, self.ft_nsamples * self.ft_seqlen, "ft_nsamples × ft_seqlen")]
        if self.val_nsamples:  # validation windows overlap neither each other nor the training windows
            out.append((self.ft_source, 2 * (self.ft_nsamples + self.val_nsamples) * self.ft_seqlen,
                        "2 × (ft_nsamples + val_nsamples) × ft_seqlen (non-overlapping validation windows)"))
        return out

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
    coef_rank: int | None = setting("int", "rank of the fusion coefficients C·D", low=1)
    lr_coef: float | None = setting("float", "learning rate of the fusion coefficients", low=0.0)
    lr_base: float | None = setting("float", "learning rate of LoRA and norms", low=0.0)
    max_terms: int | None = setting("int", "fused terms kept trainable per layer before older ones are merged "
                                    "(0 = never merge)", low=0)

    def rates(self) -> tuple[float, float]:
        return self.lr_coef, self.lr_base

    def fusion(self) -> tuple[int, int]:
        return self.coef_rank, self.max_terms
