"""SlimGPT: width pruning of attention heads and FFN channels with Optimal Brain Surgeon."""

from __future__ import annotations

from ...memory import EstimateEnv, ModelGeometry, act_bytes
from ...report import StepReport
from ...runstate import RunContext
from ...timing import block_flops, seconds
from ...width import plan_widths, prune_widths
from ..block_scoring import calibration_for
from ..registry import Method, register
from .config import HEAD_RULES, SlimGPTConfig
from .obs_chooser import OBSChooser


def run_width(ctx: RunContext, cfg: SlimGPTConfig, step: StepReport, chooser) -> None:
    """Plan (raises before any calibration work), calibrate when the chooser needs it, prune."""
    plan = plan_widths(ctx.adapter, cfg, start_params=ctx.start_decoder_params)
    calib = calibration_for(ctx, cfg) if chooser.needs_calibration else None
    prune_widths(ctx.adapter, calib, chooser, plan, step, batch_size=cfg.batch_size, label=cfg.method)
    step.details.update(schedule=cfg.schedule, r_min=cfg.min_ratio)


def width_memory(g: ModelGeometry, cfg: SlimGPTConfig, env: EstimateEnv, obs: bool = True) -> dict[str, dict[str, int]]:
    """Hidden states of all windows (twice while a block is replaced), the widest Hessian in fp32 with
    its fp64 copy and Cholesky factor at the peak of the inverse, one block's activations."""
    widest = max(g.heads * g.head_dim, g.ffn)
    return {cfg.method: {
        "resident blocks": env.resident_block(g),
        "cached states": 2 * cfg.nsamples * cfg.seqlen * g.hidden * env.nbytes if obs else 0,
        "Hessian": 5 * widest * widest * 4 if obs else 0,
        "activations": act_bytes(g, cfg.batch_size, cfg.seqlen, env.nbytes, scores=env.scores),
    }}


def width_seconds(g: ModelGeometry, cfg: SlimGPTConfig, env: EstimateEnv) -> float:
    """Per block: three partial-or-full forwards on the calibration set, and the OBS solves."""
    tokens = cfg.nsamples * cfg.seqlen
    widest = max(g.heads * g.head_dim, g.ffn)
    obs = 2 * (widest ** 3) * 2  # Cholesky-based inverse of the two Hessians, per block
    return seconds(g.n_layers * (3 * block_flops(g, tokens, cfg.seqlen) + obs), env)


register(Method(
    name="slimgpt",
    config_cls=SlimGPTConfig,
    run=lambda ctx, cfg, step: run_width(ctx, cfg, step, OBSChooser(cfg)),
    estimate_memory=width_memory,
    estimate_time=width_seconds,
    summary="SlimGPT: remove attention heads and FFN channels with OBS compensation (width)",
    kind="width",
))

__all__ = ["HEAD_RULES", "OBSChooser", "SlimGPTConfig", "run_width", "width_memory"]
