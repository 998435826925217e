"""Settings of SlimGPT (and of the magnitude baseline, which shares its budget and schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...settings import PruneConfig, check, setting
from ...width import WIDTH_SCHEDULES

HEAD_RULES = ("auto", "equal_per_group", "kv_groups")
# Widths a multiple of 128 in the cpu preset (the CPU and llama.cpp are where it runs): measured on the embedded
# model at 20% (benchmarks/RESULTS.md §12, llama.cpp 1 thread, alternating rounds), unaligned per-layer widths ran
# 0.76x / 0.88x / 0.89x dense at pp512 (f16 / q8_0 / q4_k_m); align 32 / 64 / 128 / 256 gave pp512 1.34 / 1.38 /
# 1.37 / 1.21x and tg128 1.18 / 1.25 / 1.36 / 1.22x in f16, 1.22 / 1.21 / 1.20 / 1.19x and 1.23 / 1.22 / 1.31 /
# 1.49x in q4_k_m, perplexity within 1.5% of unaligned (39.87 -> 39.89 / 40.44 / 39.97 / 39.37 wiki); 128 had the
# best mean over the six. The paper preset (the CUDA default) keeps the paper's free widths (align 1); GPU tiles
# were not measured here.
CPU_ALIGN = 128
LAYOUTS = ("per-layer", "uniform")


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

    Presets: ``paper`` = 256 × 2048 tokens of C4-like text (``news`` here), as the paper;
    ``cpu`` = 32 × 512 of ``news`` (16× the 16 × 128 set measured at 52 s on one core in
    benchmarks/results_slimgpt.md; a few minutes on 2 cores).
    """

    method: ClassVar[str] = "slimgpt"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "calib_source": "news", "schedule": "log_increase", "min_ratio": 0.0, "max_layer_ratio": 0.9,
        "head_rule": "auto", "percdamp": 0.01, "gcd": True, "dgs": True, "ffn_group_min": 64,
        "ffn_group_max": 1024, "batch_size": 8, "align": 1, "layout": "per-layer"}  # align: see CPU_ALIGN
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 256, "seqlen": 2048, "align": 1},
                                                    "cpu": {"nsamples": 32, "seqlen": 512, "align": CPU_ALIGN}}

    schedule: str | None = setting("choice", "per-layer ratio schedule (log_increase = the paper's incremental ratio)",
                                   choices=WIDTH_SCHEDULES)
    min_ratio: float | None = setting("float", "r_min of the schedule: the first layer's ratio", low=0.0, high=1.0)
    max_layer_ratio: float | None = setting("float", "cap on any layer's ratio", low=0.0, high=1.0, open_low=True,
                                            open_high=True)
    head_rule: str | None = setting("choice", "GQA rule: equal_per_group (same query heads from every K/V group), "
                                    "kv_groups (whole groups), auto", choices=HEAD_RULES)
    percdamp: float | None = setting("float", "Hessian dampening, a fraction of its mean diagonal", low=0.0)
    gcd: bool | None = setting("bool", "grouped Cholesky for heads (False = the paper's -GCD ablation)")
    dgs: bool | None = setting("bool", "dynamic group size for FFN channels (False = the -DGS ablation)")
    ffn_group_min: int | None = setting("int", "smallest FFN channel group", low=1)
    ffn_group_max: int | None = setting("int", "largest FFN channel group (the fixed size without DGS)", low=1)
    batch_size: int | None = setting("int", "calibration windows per block forward", low=1)
    align: int | None = setting("int", "kept FFN widths (and heads × head_dim) are multiples of this: 32 for llama.cpp's "
                                "q8_0/q4_0 rows, 256 for its k-quants (1 = any width, the paper)", low=1)
    layout: str | None = setting("choice", "per-layer (each layer its own widths, the paper) or uniform (every layer "
                                 "alike: a stock checkpoint of the architecture)", choices=LAYOUTS)

    def check_across(self) -> None:
        super().check_across()
        sparsity, lo, hi = self.effective("sparsity"), self.effective("min_ratio"), self.effective("max_layer_ratio")
        check(lo <= sparsity, f"min_ratio must be in [0, sparsity={sparsity}], got {lo}")
        check(sparsity <= hi, f"sparsity {sparsity} exceeds max_layer_ratio {hi}; raise max_layer_ratio "
                              "(--set max_layer_ratio=0.95) or lower the sparsity")
        gmin, gmax = self.effective("ffn_group_min"), self.effective("ffn_group_max")
        check(gmin <= gmax, f"need 1 <= ffn_group_min ({gmin}) <= ffn_group_max ({gmax})")
        check(not (self.layout == "uniform" and self.schedule not in (None, "uniform")),
              f"layout=uniform gives every layer the same widths; schedule={self.schedule} would not: drop it")

    def derive(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        super().derive(values, origins)
        if values.get("layout") == "uniform" and origins.get("schedule") != "explicit":
            values["schedule"], origins["schedule"] = "uniform", "layout uniform"

    def plan_chain(self, n_layers_start: int, n_layers_now: int) -> None:
        """Check against the depth steps before this one: they must leave room for the target.

        Uses the block counts (blocks of an unpruned model have equal size); the exact parameter
        check runs again on the model before calibration.
        """
        done = 1.0 - n_layers_now / n_layers_start
        check(done < self.sparsity,
              f"the steps before {self.method} already remove {done:.1%} of the decoder, at least its total target "
              f"{self.sparsity:.1%} (a width step's sparsity counts against the decoder at the start of the run); "
              f"raise {self.method}'s sparsity")
