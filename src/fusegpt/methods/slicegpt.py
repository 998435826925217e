"""SliceGPT (Ashkboos et al., ICLR 2024; microsoft/TransformerCompression): delete rows and columns
by rotating the residual stream onto its principal components (ALGORITHMS.md §6).

Choices (the reference's ``run_slicegpt.py`` / ``rotate_and_slice_sequential`` where the paper is
silent), the algorithm itself in :mod:`fusegpt.slicing`:

* ``target``: ``params`` (default) picks the sliced dimension d' so the decoder blocks lose
  ``sparsity`` of their parameters *including the shortcut matrices SliceGPT adds*, the budget
  every width method here uses, so methods compare at equal size; ``dim`` is the paper's
  "slicing": d' = (1 − sparsity)·D, so 25% slicing removes less than 25% of the parameters;
* d' rounded down to a multiple of ``round_interval`` (8, the reference's);
* ``slice_head`` False (the reference's default): the last block writes the full width and the
  LM head reads it; the head is always untied from the embeddings (they live in different bases);
* PCA damping ``damp`` 0.01·mean(diag H) (the reference's), fp64, signals of the model as sliced
  so far (sequential), every calibration token counted (our windows have no padding);
* calibration: ``paper`` preset 1,024 × 2,048 tokens of ``wiki`` (the paper's WikiText-2 set; the
  reference script's default is 128 × 2,048); ``cpu`` 32 × 512;
* families: pre-norm RMSNorm blocks with ``nn.Linear`` projections (Llama, Mistral, Qwen2/3,
  Gemma 1, Phi-3, the LLaVA tower); post-norm (Gemma 2/3), LayerNorm (OPT) and GPT-2 are refused
  before any work, with the reason.

Output: the ``load_pruned`` checkpoint of :mod:`fusegpt.checkpoint.sliced` (stock transformers has
no place for the shortcut matrices). Runs layer-wise under ``--offload`` (one block resident).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from ..memory import EstimateEnv, ModelGeometry, act_bytes
from ..models import DecoderAdapter
from ..report import StepReport
from ..runstate import RunContext
from ..settings import PruneConfig, setting
from ..slicing.modules import ATTN_READERS, MLP_READERS, PARTS
from ..slicing.rotate import block_roles, check_layout, rotate_and_slice
from ..timing import block_flops, seconds
from .block_scoring import calibration_for
from .registry import Method, register

logger = logging.getLogger(__name__)

TARGETS = ("params", "dim")


@dataclass
class SliceGPTConfig(PruneConfig):
    """SliceGPT: PCA rotation of the residual stream, sliced to d' (see the module docstring)."""

    method: ClassVar[str] = "slicegpt"
    DEFAULTS: ClassVar[dict[str, Any]] = {"calib_source": "wiki", "target": "params", "round_interval": 8,
                                          "slice_head": False, "damp": 0.01, "batch_size": 8}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"nsamples": 1024, "seqlen": 2048},
                                                    "cpu": {"nsamples": 32, "seqlen": 512}}

    target: str | None = setting("choice", "params (decoder loses sparsity of its parameters, shortcuts included) or "
                                 "dim (the paper's slicing: d' = (1 - s)·D)", choices=TARGETS)
    round_interval: int | None = setting("int", "d' is a multiple of this", low=1)
    slice_head: bool | None = setting("bool", "slice the last block's output and the LM head too")
    damp: float | None = setting("float", "PCA damping, a fraction of the mean diagonal", low=0.0)
    batch_size: int | None = setting("int", "calibration windows per block forward", low=1)


def sliced_params(adapter: DecoderAdapter, dim: int, slice_head: bool) -> int:
    """Decoder-block parameters after slicing the stream to ``dim`` (shortcut matrices included)."""
    D = adapter.config.hidden_size
    total = 0
    n = adapter.num_layers
    for i, block in enumerate(adapter.layers):
        d_out = dim if (slice_head or i < n - 1) else D
        roles = block_roles(adapter, block)
        norms = sum(p.numel() for name in (PARTS[0], PARTS[2]) for p in getattr(block, name).parameters())
        linear = sum(p.numel() for m in roles.values() for p in m.parameters())
        rest = sum(p.numel() for p in block.parameters()) - linear - norms
        for r, m in roles.items():
            bias = m.bias is not None
            if r in ATTN_READERS or r in MLP_READERS:
                total += m.out_features * (dim + bias)
            else:  # a writer: its output rows (and bias) are sliced (attention to d', the FFN to d_out)
                total += (m.in_features + bias) * (dim if r == "o_proj" else d_out)
        total += rest + dim * dim + dim * d_out
    return total


def choose_dim(adapter: DecoderAdapter, cfg: SliceGPTConfig, start_params: int) -> tuple[int, int]:
    """(d', decoder parameters after) for ``cfg``'s target; ConfigError when nothing fits."""
    from ..settings import ConfigError

    D, step = adapter.config.hidden_size, cfg.round_interval
    if cfg.target == "dim":
        dim = int((1 - cfg.sparsity) * D)
        dim -= dim % step
        if dim <= 0:
            raise ConfigError(f"slicing {cfg.sparsity:.0%} of {D} rounded down to a multiple of {step} leaves nothing")
        return dim, sliced_params(adapter, dim, cfg.slice_head)
    budget = (1 - cfg.sparsity) * start_params
    for dim in range(D - D % step, 0, -step):
        p = sliced_params(adapter, dim, cfg.slice_head)
        if p <= budget:
            return dim, p
    raise ConfigError(f"no sliced dimension meets {cfg.sparsity:.0%} of the decoder's parameters; lower the sparsity")


def run_slicegpt(ctx: RunContext, cfg: SliceGPTConfig, step: StepReport) -> None:
    adapter = ctx.adapter
    model = adapter.model
    before = sum(p.numel() for p in adapter.layers.parameters())
    total_before = sum(p.numel() for p in model.parameters())
    with adapter.using([0]):
        check_layout(adapter, adapter.layers[0])
    dim, expected = choose_dim(adapter, cfg, ctx.start_decoder_params)
    logger.info("slicegpt: stream %d -> %d (%s target)", adapter.config.hidden_size, dim, cfg.target)
    rec = rotate_and_slice(adapter, calibration_for(ctx, cfg), dim, slice_head=cfg.slice_head, damp=cfg.damp,
                           batch_size=cfg.batch_size)
    after = sum(p.numel() for p in adapter.layers.parameters())
    if after != expected:
        logger.warning("slicegpt: %d decoder parameters, %d expected", after, expected)
    shortcuts = sum(p.numel() for b in adapter.layers for n, p in b.named_parameters(recurse=False))
    step.details.update({
        "hidden_size": rec.hidden, "sliced_dim": dim, "slicing": round(1 - dim / rec.hidden, 6),
        "head_dim": rec.head_dim, "target": cfg.target, "sparsity_target": cfg.sparsity,
        "sparsity_basis": "decoder-block parameters at the start of the run (shortcut matrices included)",
        "sparsity_achieved": round(1 - after / ctx.start_decoder_params, 6),
        "decoder_params": {"start": ctx.start_decoder_params, "before": before, "after": after,
                           "shortcut_matrices": shortcuts},
        "total_params": {"before": total_before, "after": sum(p.numel() for p in model.parameters())},
        "embedding_energy_kept": round(rec.embedding_kept, 6),
        "layers": rec.layers,
    })


def _memory(g: ModelGeometry, cfg: SliceGPTConfig, env: EstimateEnv) -> dict[str, dict[str, int]]:
    states = cfg.nsamples * cfg.seqlen * g.hidden
    return {cfg.method: {
        "resident blocks": env.resident_block(g),
        "cached states (stream in and out, and fp64 copies while rotating)": states * (2 * env.nbytes + 8),
        "covariance and eigenvectors (fp64)": 4 * g.hidden * g.hidden * 8,
        "activations": act_bytes(g, cfg.batch_size, cfg.seqlen, env.nbytes, scores=env.scores),
        "untied LM head": g.vocab * g.hidden * env.nbytes,
    }}


def _time(g: ModelGeometry, cfg: SliceGPTConfig, env: EstimateEnv) -> float:
    tokens = cfg.nsamples * cfg.seqlen
    return seconds(g.n_layers * (2 * block_flops(g, tokens, cfg.seqlen) + 4 * tokens * g.hidden ** 2
                                 + 10 * g.hidden ** 3), env)


register(Method(
    name="slicegpt",
    config_cls=SliceGPTConfig,
    run=run_slicegpt,
    estimate_memory=_memory,
    estimate_time=_time,
    summary="SliceGPT: rotate the residual stream onto its principal components and slice it (width)",
    kind="width",
))

__all__ = ["SliceGPTConfig", "choose_dim", "sliced_params"]
