"""LLM-Pruner (Ma et al., NeurIPS 2023; horseee/LLM-Pruner): width pruning of coupled structures by
first-order Taylor importance, the same ratio in every block but the first and last few.

Choices (the reference's ``hf_prune.py`` / ``TaylorImportance`` where the paper is silent):

* one backward pass of the language-model loss on the calibration windows (the reference: 10
  samples of 64 tokens, ``iterative_steps=1``) on the model before any pruning; salience
  ``s = w · ∂L/∂w`` per weight;
* ``taylor``: ``element`` (the reference's default ``param_first``: Σ|s| over each row / column)
  or ``vector`` (``vectorize``: |Σ s| over each row / column); a unit's importance is the sum over
  its coupled weights (``grouping_strategy=sum``): a head = its q rows + o columns (+ its K/V
  group's k/v rows when whole groups go), an FFN channel = its gate and up rows + down column;
* the lowest units of each block go, no compensation; GQA by the same head rules as SlimGPT
  (``equal_per_group`` for GQA, ``kv_groups`` for MHA);
* ratio: ``uniform`` over the blocks between ``keep_first`` (4) and the last ``keep_last`` (2),
  the reference's ``block_*_layer_start 4 … end 30`` of LLaMA-7B's 32; that ratio is solved so the
  decoder loses ``sparsity`` of its parameters, as for SlimGPT (heads nearest the ratio, FFN
  channels absorb the rest);
* the LoRA recovery the paper adds is ``fusegpt heal`` / ``--heal`` (any method's output).

Needs the whole model's gradients at once: not layer-wise (``--offload`` is refused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import EstimateEnv, ModelGeometry
from ..report import StepReport
from ..runstate import RunContext
from ..settings import check, setting
from ..timing import block_flops, head_flops, seconds
from ..width import width_roles
from .block_scoring import calibration_for
from .magnitude import ScoreChooser
from .registry import Method, register
from .slimgpt import SlimGPTConfig, run_width, width_memory
from .slimgpt.config import CPU_ALIGN

logger = logging.getLogger(__name__)

TAYLOR = ("element", "vector")
_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0, "gate_proj": 1, "up_proj": 1, "down_proj": 0}


@dataclass
class LLMPrunerConfig(SlimGPTConfig):
    """LLM-Pruner: first-order Taylor importance of heads and FFN channels, uniform ratio inside
    ``keep_first`` … ``L − keep_last``. Presets: ``paper`` and ``cpu`` both 10 × 64 tokens (the
    reference's; a few seconds on 2 cores for the embedded model). ``batch_size``: windows per
    backward (gradients accumulate over all windows, so the result is the same; 1 keeps the
    activations of one window: at 10 × 256 tokens per backward the embedded model peaked at 6.8 GB)."""

    method: ClassVar[str] = "llm-pruner"
    DEFAULTS: ClassVar[dict[str, Any]] = {"schedule": "uniform", "taylor": "element", "keep_first": 4,
                                          "keep_last": 2, "batch_size": 1}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 10, "seqlen": 64, "align": 1},
                                                    "cpu": {"nsamples": 10, "seqlen": 64, "align": CPU_ALIGN}}

    taylor: str | None = setting("choice", "element (sum of |w·g| per row/column, the reference's default) or "
                                 "vector (|sum of w·g|)", choices=TAYLOR)
    keep_first: int | None = setting("int", "first blocks kept whole", low=0)
    keep_last: int | None = setting("int", "last blocks kept whole", low=0)

    def derive(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        super().derive(values, origins)
        if values.get("layout") == "uniform":  # every block alike: none kept whole unless asked (then refused)
            for k in ("keep_first", "keep_last"):
                if origins.get(k) != "explicit":
                    values[k], origins[k] = 0, "layout uniform"

    def check_across(self) -> None:
        super().check_across()
        # unset keep_* become 0 under layout=uniform (derive); only explicit ones can be non-zero here
        check(not (self.layout == "uniform" and (self.keep_first or self.keep_last)),
              "layout=uniform prunes every block alike; keep_first / keep_last keep some whole: set them to 0")

    def plan_placement(self, offload: bool, device_type: str) -> None:
        super().plan_placement(offload, device_type)
        check(not offload, "llm-pruner needs the whole model's gradients at once and does not run layer-wise "
                           "(--offload); run it resident, or use slimgpt, which runs layer-wise")


def taylor_statistics(adapter, calib: torch.Tensor, taylor: str, batch_size: int) -> dict[tuple[int, str], torch.Tensor]:
    """``{(id(block), role): per-row or per-column salience}`` from one backward of the LM loss."""
    model = adapter.model
    flags = {id(p): p.requires_grad for p in model.parameters()}
    lins = [(block, role, lin) for block in adapter.layers for role, lin in width_roles(adapter, block).items()]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, lin in lins:
        lin.weight.requires_grad_(True)
        lin.weight.grad = None
    was_training = model.training
    model.eval()
    try:
        n = calib.shape[0]
        with torch.enable_grad():
            for ids in calib.split(batch_size):
                ids = ids.to(adapter.device)
                logits = model(ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                (loss * ids.shape[0] / n).backward()  # the mean loss over all windows, as one batch
        out = {}
        for block, role, lin in lins:
            sal = (lin.weight.detach().float() * lin.weight.grad.float())
            dim = _AXES[role]
            out[(id(block), role)] = sal.abs().sum(dim) if taylor == "element" else sal.sum(dim).abs()
            lin.weight.grad = None
        return out
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))


def run_llm_pruner(ctx: RunContext, cfg: LLMPrunerConfig, step: StepReport) -> None:
    adapter = ctx.adapter
    cfg.plan_placement(adapter.offloader is not None, adapter.device.type)  # checked in the plan too
    from ..width import plan_widths

    plan_widths(adapter, cfg, start_params=ctx.start_decoder_params)  # an impossible budget fails before the backward
    stats = taylor_statistics(adapter, calibration_for(ctx, cfg), cfg.taylor, cfg.batch_size)

    def stat(block: nn.Module, role: str, lin: nn.Linear, dim: int) -> torch.Tensor:
        return stats[(id(block), role)]

    run_width(ctx, cfg, step, ScoreChooser(stat))
    step.details.update(taylor=cfg.taylor, keep_first=cfg.keep_first, keep_last=cfg.keep_last)


def _memory(g: ModelGeometry, cfg: LLMPrunerConfig, env: EstimateEnv) -> dict[str, dict[str, int]]:
    parts = width_memory(g, cfg, env, obs=False)[cfg.method]
    tokens = min(cfg.batch_size, cfg.nsamples) * cfg.seqlen
    parts["gradients (fp32, decoder linears)"] = g.n_layers * g.block_params * 4
    # per layer ~24 values per token and hidden unit plus the attention probabilities (fp32), and the logits
    # with their softmax and gradient
    parts["activations kept for backward"] = (g.n_layers * (24 * tokens * g.hidden + 2 * g.heads * tokens * cfg.seqlen)
                                              * 4 + tokens * g.vocab * 12)
    return {cfg.method: parts}


def _time(g: ModelGeometry, cfg: LLMPrunerConfig, env: EstimateEnv) -> float:
    tokens = cfg.nsamples * cfg.seqlen
    return seconds(3 * (g.n_layers * block_flops(g, tokens, cfg.seqlen) + head_flops(g, tokens)), env)


register(Method(
    name="llm-pruner",
    config_cls=LLMPrunerConfig,
    run=run_llm_pruner,
    estimate_memory=_memory,
    estimate_time=_time,
    summary="LLM-Pruner: remove heads / FFN channels of least first-order Taylor importance (width)",
    kind="width",
))
