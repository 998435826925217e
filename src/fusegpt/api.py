"""The public entry points: ``compress`` (one call does the whole job) and ``evaluate``.

Methods plug in through :func:`register_method`: a runner receives the adapter, the tokenizer,
its config and a :class:`StepReport` to fill, and edits the model in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import BlockPruneConfig, EvalConfig, PruneConfig
from .data import calibration_windows, check_source, eval_tokens
from .eval.perplexity import perplexity
from .models import DecoderAdapter, get_adapter
from .report import Report, StepReport, library_versions
from .utils import PeakMemory, count_params, seed_everything

logger = logging.getLogger(__name__)

Runner = Callable[[DecoderAdapter, object, PruneConfig, StepReport], None]
_RUNNERS: dict[str, Runner] = {}


def register_method(*names: str) -> Callable[[Runner], Runner]:
    """Decorator: ``runner`` performs the methods ``names`` (matching their configs' ``method``)."""

    def deco(fn: Runner) -> Runner:
        for n in names:
            _RUNNERS[n] = fn
        return fn

    return deco


def calibration_for(tokenizer, cfg: PruneConfig) -> torch.Tensor:
    c = cfg.calib
    return calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, c.seed)


@register_method("shortgpt", "sleb", "mi")
def _run_blocks(adapter: DecoderAdapter, tokenizer, cfg: PruneConfig, step: StepReport) -> None:
    from .prune.blocks import run_block_pruning

    assert isinstance(cfg, BlockPruneConfig)
    run_block_pruning(adapter, calibration_for(tokenizer, cfg), cfg, step)


def _load_method_plugins() -> None:
    """Import the modules that register FuseGPT / MI+FT and SlimGPT / magnitude runners.

    Imported on first use rather than at module import: they import this module themselves.
    """
    from .prune import fusion, width  # noqa: F401


def check_plan(model: nn.Module, configs: Sequence[PruneConfig]) -> None:
    """Validate a run against the model before any long work (sources, seqlen, block budget)."""
    adapter = get_adapter(model)
    ctx = adapter.max_context
    n_layers = n_start = adapter.num_layers
    for cfg in configs:
        check_source(cfg.calib.source)
        if ctx and cfg.calib.seqlen > ctx:
            raise ValueError(f"seqlen {cfg.calib.seqlen} exceeds the model's context of {ctx} tokens; lower --seqlen")
        n_layers = cfg.plan_layers(n_layers)
        cfg.plan_chain(n_start, n_layers)
        if cfg.method not in _RUNNERS:
            raise ValueError(f"method {cfg.method!r} is not available; choose from {', '.join(sorted(_RUNNERS))}")


def compress(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | Sequence[PruneConfig],
    model_name: str = "",
    eval_config: EvalConfig | None = None,
) -> tuple[nn.Module, Report]:
    """Prune ``model`` in place with one config or a chain of them; return it and the Report.

    With ``eval_config``, perplexity is measured before and after and stored in the report.
    """
    _load_method_plugins()
    configs = [config] if isinstance(config, PruneConfig) else list(config)
    if not configs:
        raise ValueError("give at least one pruning config")
    check_plan(model, configs)
    adapter = get_adapter(model)
    device = adapter.device
    report = Report(
        model=model_name or getattr(model.config, "_name_or_path", ""),
        seed=configs[0].calib.seed,
        layers_before=adapter.num_layers,
        params_before=count_params(model),
        device=str(device),
        versions=library_versions(),
    )
    if eval_config is not None:
        report.perplexity["before"] = evaluate(model, tokenizer, eval_config)
        report.eval_settings = {"seqlen": eval_config.seqlen, "max_tokens": eval_config.max_tokens}
    # width methods count their sparsity against the decoder as it was when the run started
    model._fusegpt_run_start = {"decoder_params": sum(p.numel() for p in adapter.layers.parameters()),
                                "n_layers": adapter.num_layers}
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        for cfg in configs:
            seed_everything(cfg.calib.seed)
            step = StepReport(method=cfg.method, config=cfg.to_dict())
            t0 = time.perf_counter()
            with PeakMemory(device) as step_mem:
                _RUNNERS[cfg.method](get_adapter(model), tokenizer, cfg, step)
            step.wall_time_s = time.perf_counter() - t0
            step.peak_memory_mb = round(step_mem.peak_mb, 1)
            report.steps.append(step)
            logger.info("%s done in %.1fs", cfg.method, step.wall_time_s)
    report.wall_time_s = time.perf_counter() - start
    report.peak_memory_mb = round(mem.peak_mb, 1)
    report.layers_after = get_adapter(model).num_layers
    report.params_after = count_params(model)
    if eval_config is not None:
        report.perplexity["after"] = evaluate(model, tokenizer, eval_config)
    return model, report


def evaluate(model: nn.Module, tokenizer, config: EvalConfig | None = None) -> dict[str, float]:
    """Perplexity (GPTQ protocol) on each source of ``config.data``: ``{source: ppl}``."""
    config = config or EvalConfig()
    for src in config.data:
        check_source(src)
    out = {}
    for src in config.data:
        toks = eval_tokens(tokenizer, src, config.seqlen)
        out[src] = perplexity(model, toks, config.seqlen, config.max_tokens, config.batch_size, desc=f"ppl {src}")
    return out
