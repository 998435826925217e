"""Configuration dataclasses: one per method, plus evaluation. Each validates itself.

A config is the whole recipe of a run: serialising it (``dataclasses.asdict``) is what the
report stores, and what a YAML/JSON recipe would hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class CalibrationConfig:
    """Seeded calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from ``source``."""

    source: str = "wiki"
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.nsamples >= 1, f"nsamples must be >= 1, got {self.nsamples}")
        _check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")


@dataclass
class PruneConfig:
    """Settings every pruning method shares."""

    method: ClassVar[str] = ""
    sparsity: float = 0.25
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.calib, dict):
            self.calib = CalibrationConfig(**self.calib)
        _check(
            isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity < 1.0,
            f"sparsity must be in (0, 1), got {self.sparsity}; e.g. --sparsity 0.25 removes a quarter",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def plan_layers(self, n_layers: int) -> int:
        """Check this step against a model of ``n_layers`` blocks; return the blocks left after it.

        Raises ConfigError when the budget cannot be met. Width methods leave the count as is.
        """
        return n_layers

    def plan_chain(self, n_layers_start: int, n_layers_now: int) -> None:
        """Check this step against the steps before it in a chain (``n_layers_start`` blocks at the
        start of the run, ``n_layers_now`` after the earlier steps); raises ConfigError. Default: no check."""

    def with_overrides(self, **kw: Any) -> PruneConfig:
        """A copy with the given fields replaced (``None`` values are ignored); validates again."""
        names = {f.name for f in fields(self)}
        unknown = set(kw) - names - {"nsamples", "seqlen", "seed", "calib_source"}
        _check(not unknown, f"unknown setting(s) for {self.method}: {', '.join(sorted(unknown))}")
        calib_kw = {
            k2: kw.pop(k) for k, k2 in (("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed"),
                                        ("calib_source", "source")) if k in kw and kw[k] is not None
        }
        kw = {k: v for k, v in kw.items() if v is not None}
        calib = replace(self.calib, **calib_kw) if calib_kw else self.calib
        return replace(self, calib=calib, **kw)


def blocks_to_remove(n_layers: int, sparsity: float) -> int:
    """k = ceil(L · s), as both papers round (ALGORITHMS.md §1)."""
    return math.ceil(n_layers * sparsity - 1e-9)


@dataclass
class BlockPruneConfig(PruneConfig):
    """Block (depth) pruning by an importance score; subclasses name the score.

    ``early_barrier``/``latter_barrier``: how many first/last blocks are never candidates.
    """

    early_barrier: int = 0
    latter_barrier: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.early_barrier >= 0 and self.latter_barrier >= 0, "barriers must be >= 0")

    def plan_layers(self, n_layers: int) -> int:
        k = blocks_to_remove(n_layers, self.sparsity)
        n_cand = n_layers - self.early_barrier - self.latter_barrier
        _check(k < n_layers, f"sparsity {self.sparsity} removes all {n_layers} blocks; choose a smaller sparsity")
        _check(k <= n_cand, f"sparsity {self.sparsity} needs {k} blocks but only {n_cand} are candidates "
               f"(barriers {self.early_barrier}+{self.latter_barrier}); lower the sparsity or the barriers")
        return n_layers - k


@dataclass
class ShortGPTConfig(BlockPruneConfig):
    """ShortGPT: one-shot Block Influence ranking, drop the k lowest."""

    method: ClassVar[str] = "shortgpt"


@dataclass
class SLEBConfig(BlockPruneConfig):
    """SLEB: iterative, drop the block whose removal keeps calibration loss lowest.

    Barriers default to 1 as in SLEB's reference code; calibration 128 windows.
    """

    method: ClassVar[str] = "sleb"
    early_barrier: int = 1
    latter_barrier: int = 1
    calib: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(nsamples=128))


@dataclass
class MIConfig(BlockPruneConfig):
    """MI (FuseGPT's Macro Influence), iterative, drop only (the paper's "MI" ablation)."""

    method: ClassVar[str] = "mi"


@dataclass
class EvalConfig:
    """Perplexity evaluation (GPTQ protocol) on one or more sources."""

    data: tuple[str, ...] = ("wiki", "news")
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        _check(len(self.data) > 0, "give at least one evaluation data source")
        _check(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")
        _check(self.max_tokens is None or self.max_tokens >= self.seqlen,
               f"max_tokens ({self.max_tokens}) must be at least seqlen ({self.seqlen})")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


# Method name -> config class; later issues register their own (FuseGPT, SlimGPT).
METHOD_CONFIGS: dict[str, type[PruneConfig]] = {
    c.method: c for c in (ShortGPTConfig, SLEBConfig, MIConfig)
}


def register_method_config(cls: type[PruneConfig]) -> type[PruneConfig]:
    """Class decorator: make ``cls`` available by its ``method`` name (CLI, recipes)."""
    METHOD_CONFIGS[cls.method] = cls
    return cls


def config_for(method: str, **settings: Any) -> PruneConfig:
    """Build the config of ``method`` from flat settings (None = default)."""
    try:
        cls = METHOD_CONFIGS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(sorted(METHOD_CONFIGS))}") from None
    return cls().with_overrides(**settings)


# ---------------------------------------------------------------- FuseGPT and MI+FT (issue 3)
# Preset values; an explicit setting (Python field or --set) always wins. ``calib_nsamples`` /
# ``calib_seqlen`` size the MI ranking set and apply while ``calib`` keeps the generic 32 × 2048.
GROUP_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # the paper / reference code: 32 × 2048 MI calibration, 128 × 2048 fine-tuning, 20 epochs
    "paper": dict(group_size=8, lora_rank=128, coef_rank=128, epochs=20, batch_size=8, lr_coef=1e-3,
                  lr_base=9.65e-6, lr=1e-3, loss="kl-batch", ft_nsamples=128, ft_seqlen=2048, max_terms=4,
                  calib_nsamples=32, calib_seqlen=2048),
    # embedded SmolLM2-135M on 2 CPU cores: sized from measured step times (7 blocks fwd+bwd on 8×256
    # tokens ≈ 2.2 s, one MI ranking on 8×256 ≈ 45 s) to remove 8 of 30 blocks in ~15 min; loss and
    # learning rates from the measurements in ALGORITHMS.md §2 (MSE beat the batch-softmax KL, LoRA
    # needs ~1e-3); results in benchmarks/results_fusegpt.md
    "cpu": dict(group_size=8, lora_rank=32, coef_rank=32, epochs=4, batch_size=8, lr_coef=1e-3,
                lr_base=1e-3, lr=1e-3, loss="mse", ft_nsamples=32, ft_seqlen=256, max_terms=4,
                calib_nsamples=8, calib_seqlen=256),
}
_GROUP_LOSSES = ("kl-batch", "mse", "cosine", "mse+cosine", "kl-logits")


@dataclass
class GroupTrainConfig(BlockPruneConfig):
    """Shared settings of FuseGPT and MI+FT: MI ranking, partial group, knowledge learning.

    Fields left ``None`` take the preset's value (``GROUP_TRAIN_PRESETS``). ``preset=None``
    means ``paper`` on a CUDA device and ``cpu`` otherwise; the report records the resolved
    values. ``ft_*``: the fine-tuning set (default: the calibration source, same seed).
    ``state_dir``/``resume``: per-block state for ``--resume`` after an interruption.
    ``amp_dtype``: ``auto`` (the model's dtype, autocast on CUDA), ``bf16``, ``fp16``, ``fp32``.
    ``revert_if_worse``: after a group is trained, measure its loss again; if it is not below the
    loss before training, undo the training and keep the plain removal for that block (listed in
    the report's ``fallbacks``). Not in the paper (off in both presets); measured in
    benchmarks/RESULTS.md §2.
    """

    preset: str | None = None
    group_size: int | None = None
    lora_rank: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    ft_nsamples: int | None = None
    ft_seqlen: int | None = None
    ft_source: str | None = None
    mi_batch_size: int = 1
    train_norms: bool = True
    max_retries: int = 2
    retry_lr_factor: float = 0.1
    amp_dtype: str = "auto"
    state_dir: str | None = None
    resume: bool = False
    revert_if_worse: bool = False

    _own_keys: ClassVar[tuple[str, ...]] = ("group_size", "lora_rank", "epochs", "batch_size", "loss",
                                            "ft_nsamples", "ft_seqlen")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.preset is None or self.preset in GROUP_TRAIN_PRESETS,
               f"unknown preset {self.preset!r}; choose from {', '.join(GROUP_TRAIN_PRESETS)}")
        for name in ("group_size", "epochs", "batch_size", "ft_nsamples", "ft_seqlen"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v >= 1), f"{name} must be an integer >= 1, got {v!r}")
        _check(self.ft_seqlen is None or self.ft_seqlen >= 2, "ft_seqlen must be >= 2")
        _check(self.lora_rank is None or self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        _check(self.loss is None or self.loss in _GROUP_LOSSES,
               f"unknown loss {self.loss!r}; choose from {', '.join(_GROUP_LOSSES)}")
        _check(self.mi_batch_size >= 1, "mi_batch_size must be >= 1")
        _check(self.max_retries >= 0, "max_retries must be >= 0")
        _check(0 < self.retry_lr_factor < 1, "retry_lr_factor must be in (0, 1), e.g. 0.1")
        _check(self.amp_dtype in ("auto", "bf16", "fp16", "fp32"), "amp_dtype must be auto, bf16, fp16 or fp32")

    def preset_name(self, device_type: str = "cpu") -> str:
        return self.preset or ("paper" if device_type == "cuda" else "cpu")

    def resolved(self, device_type: str = "cpu") -> dict[str, Any]:
        """Every training setting, with ``None`` fields filled from the preset."""
        name = self.preset_name(device_type)
        p = GROUP_TRAIN_PRESETS[name]
        out: dict[str, Any] = {"preset": name}
        for k in self._own_keys:
            v = getattr(self, k)
            out[k] = p[k] if v is None else v
        out["ft_source"] = self.ft_source or self.calib.source
        d = CalibrationConfig()
        out["calib"] = replace(
            self.calib,
            nsamples=p["calib_nsamples"] if self.calib.nsamples == d.nsamples else self.calib.nsamples,
            seqlen=p["calib_seqlen"] if self.calib.seqlen == d.seqlen else self.calib.seqlen,
        )
        return out


@register_method_config
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

    _own_keys: ClassVar[tuple[str, ...]] = (*GroupTrainConfig._own_keys, "coef_rank", "lr_coef", "lr_base",
                                            "max_terms")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.coef_rank is None or self.coef_rank >= 1, f"coef_rank must be >= 1, got {self.coef_rank}")
        for name in ("lr_coef", "lr_base"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, (int, float)) and v >= 0), f"{name} must be >= 0, got {v!r}")
        _check(self.max_terms is None or self.max_terms >= 0, "max_terms must be >= 0 (0 = never merge)")


@register_method_config
@dataclass
class MIFTConfig(GroupTrainConfig):
    """MI + FT (the paper's ablation): MI ranking, drop, then train the same group with the same
    loss, LoRA and norms only (no fusion), at its own learning rate ``lr`` (default 1e-3, tuned
    on the embedded model; at the paper's 9.65e-6 plain fine-tuning barely moves).
    """

    method: ClassVar[str] = "mi+ft"
    lr: float | None = None

    _own_keys: ClassVar[tuple[str, ...]] = (*GroupTrainConfig._own_keys, "lr")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.lr is None or (isinstance(self.lr, (int, float)) and self.lr >= 0), f"lr must be >= 0, got {self.lr!r}")


# ---------------------------------------------------------------- SlimGPT width pruning (issue 4)
WIDTH_SCHEDULES = ("log_increase", "uniform", "linear_increase", "log_decrease", "linear_decrease")
HEAD_RULES = ("auto", "equal_per_group", "kv_groups")


@register_method_config
@dataclass
class SlimGPTConfig(PruneConfig):
    """SlimGPT: layer-wise OBS width pruning of attention heads and FFN channels (ALGORITHMS.md §3).

    ``sparsity``: fraction of *decoder-block parameters* removed, counted against the decoder as
    it was when the run (``compress`` call / CLI chain) started, so in ``mi+slimgpt`` with
    ``0.125,0.2`` the width step brings the total to 20% (the depth step must leave room).
    Embeddings, final norm and LM head are not counted and never pruned.

    ``schedule``: per-layer ratio r_l = min_ratio + (r_max − min_ratio)·f(l) with f the shape
    (``log_increase``: ln(1+l)/ln(L), L the model's current block count); r_max is solved so the
    parameter target is met exactly on the discrete widths; each layer's ratio is capped at
    ``max_layer_ratio``. ``head_rule`` (GQA): ``equal_per_group`` removes the same number of
    query heads from every K/V group and keeps all K/V heads; ``kv_groups`` removes whole K/V
    groups (their query heads and K/V head); ``auto`` = ``equal_per_group`` for GQA, ``kv_groups``
    for MHA. ``percdamp``: Hessian dampening λ·mean(diag H). ``gcd``/``dgs``: grouped Cholesky
    for heads and Dynamic Group Size for FFN channels (False = the paper's −GCD / −DGS
    ablations; without DGS groups have ``ffn_group_max`` channels). ``batch_size``: calibration
    windows per block forward.

    Defaults follow the paper: 256 × 2048 tokens of C4-like text (``news`` here). On CPU use
    e.g. ``--nsamples 16 --seqlen 128`` (52 s for the embedded SmolLM2-135M on one core,
    benchmarks/results_slimgpt.md) or ``--nsamples 32 --seqlen 512`` (about 8× the forward work).
    """

    method: ClassVar[str] = "slimgpt"
    calib: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(source="news", nsamples=256,
                                                                               seqlen=2048))
    schedule: str = "log_increase"
    min_ratio: float = 0.0
    max_layer_ratio: float = 0.9
    head_rule: str = "auto"
    percdamp: float = 0.01
    gcd: bool = True
    dgs: bool = True
    ffn_group_min: int = 64
    ffn_group_max: int = 1024
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.schedule in WIDTH_SCHEDULES,
               f"unknown schedule {self.schedule!r}; choose from {', '.join(WIDTH_SCHEDULES)}")
        _check(self.head_rule in HEAD_RULES, f"unknown head_rule {self.head_rule!r}; choose from {', '.join(HEAD_RULES)}")
        _check(0.0 < self.max_layer_ratio < 1.0, f"max_layer_ratio must be in (0, 1), got {self.max_layer_ratio}")
        _check(0.0 <= self.min_ratio <= self.sparsity,
               f"min_ratio must be in [0, sparsity={self.sparsity}], got {self.min_ratio}")
        _check(self.sparsity <= self.max_layer_ratio,
               f"sparsity {self.sparsity} exceeds max_layer_ratio {self.max_layer_ratio}; raise max_layer_ratio "
               "(--set max_layer_ratio=0.95) or lower the sparsity")
        _check(isinstance(self.percdamp, (int, float)) and self.percdamp >= 0,
               f"percdamp must be >= 0 (e.g. 0.01), got {self.percdamp!r}")
        _check(isinstance(self.gcd, bool) and isinstance(self.dgs, bool), "gcd and dgs must be True or False")
        _check(1 <= self.ffn_group_min <= self.ffn_group_max,
               f"need 1 <= ffn_group_min ({self.ffn_group_min}) <= ffn_group_max ({self.ffn_group_max})")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")

    def plan_chain(self, n_layers_start: int, n_layers_now: int) -> None:
        """Check against the depth steps before this one: they must leave room for the target.

        Uses the block counts (blocks of an unpruned model have equal size); the exact parameter
        check runs again on the model before calibration.
        """
        done = 1.0 - n_layers_now / n_layers_start
        _check(done < self.sparsity,
               f"the steps before {self.method} already remove {done:.1%} of the decoder, at least its total target "
               f"{self.sparsity:.1%} (a width step's sparsity counts against the decoder at the start of the run); "
               f"raise {self.method}'s sparsity")


@register_method_config
@dataclass
class MagnitudeWidthConfig(SlimGPTConfig):
    """Width-pruning baseline: drop the heads / FFN channels of least weight norm, no OBS update.

    Same budget, schedule and GQA rule as SlimGPT; needs no calibration data. Scores: squared
    L2 norm of every weight tied to the unit (q rows + o columns (+ k/v rows for whole K/V
    groups); gate/up rows + down columns).
    """

    method: ClassVar[str] = "magnitude"
