"""Up-front estimate of the peak memory a pruning run needs, from the config alone.

Resident runs peak at the whole model plus the largest working set of any step. Layer-wise runs
(``offload``, :mod:`fusegpt.offload`) keep only the non-block weights and add, per step, the blocks
it holds at once: one for scoring, OBS and perplexity; for group training the ``g`` blocks of the
group plus each student's stored copies of fused weights (up to ``max_terms`` per layer). With ``b`` the bytes per model value (4 for fp32, 2 for
bf16/fp16), ``P`` the parameter count, ``L`` blocks, ``h`` hidden size, ``I`` FFN width, ``H``
query heads, ``V`` vocabulary, ``P_blk`` parameters per block:

* **weights** ``= P·b``;
The parts below are each method's own estimate (its record in :mod:`fusegpt.methods`); this
module holds the geometry and the shared pieces.

* **block scoring** (ShortGPT/SLEB/MI, and FuseGPT's MI ranking): the states entering every block
  are kept for one calibration batch ``B×T`` so each candidate restarts from its own input:
  ``(L+1)·B·T·h·b``; plus one block's activations ``act(B, T)`` and, for SLEB, the fp32 logits
  ``B·T·V·4``;
* **FuseGPT / MI+FT group training** (per removed block, group of ``g`` blocks, fine-tuning set
  ``N×T_ft``, training batch ``B_ft``, LoRA rank ``r``, coefficient rank ``r_c``, ``m`` kept terms):
  cached group inputs and teacher outputs ``2·N·T_ft·h·b``; trainable factors with fp32
  value, gradient and two Adam moments ``16·(g−1)·(r + m·r_c)·Σ_roles(in+out)``; fp32 effective
  weights and their gradients ``2·(g−1)·P_blk·4``; autograd activations ``(g−1)·act(B_ft, T_ft)``
  in fp32;
* **SlimGPT** (width): hidden states of all calibration windows, twice while a block is replaced,
  ``2·N·T·h·b``; the Hessian of the widest pruned input (``max(H·d, I)²``) in fp32, with its
  fp64 copy and Cholesky factor while it is inverted, ``5·max(H·d, I)²·4``; one block's activations;
* **perplexity** (when the run evaluates): fp32 logits and log-softmax ``2·B_e·T_e·V·4`` plus one
  block's activations.

``act(B, T) = B·T·(4h + 3I + 3H·d)·b' + 3·B·H·T²·4`` (projections, FFN intermediates, attention
scores, their softmax and mask — dropped on CUDA, where SDPA's flash / memory-efficient kernels
do not materialise them; ``b'`` the compute dtype). On top comes a fixed **runtime** of
800 MB: Python, torch, transformers and tokenizers (about 220 MB) plus the tokenized embedded
corpora and the allocator's slack, measured on the embedded model. The estimate is meant to be an
upper bound of the measured peak; ``benchmarks/bench_memory_estimate.py`` checks it for every
method on the embedded model (benchmarks/RESULTS.md §6), and ``--max-memory`` also stops a run
whose measured memory crosses the budget (:class:`fusegpt.utils.MemoryGuard`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError
from .models import get_adapter

logger = logging.getLogger(__name__)

# Python, torch, transformers and tokenizers (~220 MB measured) plus the tokenized text of the
# embedded corpora and the allocator's slack (~580 MB measured on the embedded model's runs)
RUNTIME_BYTES = 800 * 10**6
# autograd keeps about as much again as a forward's live activations (saved inputs of every
# linear, norm and activation function, and their gradients during backward)
TRAINING_ACTIVATIONS = 2.0
_UNITS = {"": 1e9, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5 TB"``, ``16`` (GB) → bytes."""
    if isinstance(text, (int, float)):
        return int(text * 1e9)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 24GB, 512MiB or 16 (GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.0f} kB"


@dataclass
class MemoryEstimate:
    """Peak bytes of a run: the resident weights plus the largest step's working set."""

    weights: int
    steps: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> part -> bytes
    runtime: int = RUNTIME_BYTES

    @property
    def peak_step(self) -> str | None:
        return max(self.steps, key=lambda s: sum(self.steps[s].values())) if self.steps else None

    @property
    def total(self) -> int:
        s = self.peak_step
        return self.runtime + self.weights + (sum(self.steps[s].values()) if s else 0)

    def describe(self) -> str:
        s = self.peak_step
        parts = [f"runtime {format_size(self.runtime)}", f"weights {format_size(self.weights)}"]
        if s:
            parts += [f"{k} {format_size(v)}" for k, v in self.steps[s].items() if v]
        return f"{format_size(self.total)} (" + ", ".join(parts) + (f"; peak step: {s})" if s else ")")


@dataclass
class ModelGeometry:
    """The sizes estimates need, read from a model or from its config alone."""

    params: int
    n_layers: int
    hidden: int
    ffn: int
    heads: int
    head_dim: int
    vocab: int
    block_params: int
    blocks_params: int  # all blocks together
    roles_io: int  # Σ over a block's linear roles of (in + out)
    max_context: int | None = None
    residual_down_proj: bool = True  # the adapter's: may a linear map be folded into the down projection?

    @classmethod
    def of(cls, model_or_config) -> ModelGeometry:
        """From a loaded model, or from a config (a meta-device copy counts parameters; nothing is
        allocated); a geometry is returned as is."""
        if isinstance(model_or_config, ModelGeometry):
            return model_or_config
        model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
        a = get_adapter(model)
        block = a.layers[0]
        roles = a.linear_roles(block)
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            n_layers=a.num_layers,
            hidden=a.config.hidden_size,
            ffn=a.intermediate_size(block),
            heads=a.num_heads(block),
            head_dim=a.head_dim,
            vocab=a.config.vocab_size,
            block_params=max(sum(p.numel() for p in blk.parameters()) for blk in a.layers),
            blocks_params=sum(p.numel() for p in a.layers.parameters()),
            roles_io=sum(m.in_features + m.out_features for m in roles.values()),
            max_context=a.max_context,
            residual_down_proj=type(a).residual_down_proj,
        )


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if getattr(config, "model_type", "") == "llava":
            from transformers import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(config)


@dataclass
class EstimateEnv:
    """Where a run executes, as estimates need it.

    ``nbytes``: bytes per model value; ``offload``: layer-wise execution; ``flops_per_s``: the
    device's measured dense matmul rate (:func:`fusegpt.timing.measure_flops`).
    """

    device_type: str = "cpu"
    nbytes: int = 4
    offload: bool = False
    flops_per_s: float = 5e10

    @property
    def scores(self) -> bool:
        """Attention scores materialised (CPU math / eager; SDPA kernels on CUDA do not)."""
        return self.device_type != "cuda"

    def resident_block(self, g: ModelGeometry) -> int:
        """Bytes of one block brought onto the device (0 when the whole model is resident)."""
        return g.block_params * self.nbytes if self.offload else 0


def act_bytes(g: ModelGeometry, batch: int, seqlen: int, nbytes: int, scores: bool = True) -> int:
    """Activations of one block forward: projections, FFN intermediates (+ attention scores)."""
    dense = batch * seqlen * (4 * g.hidden + 3 * g.ffn + 3 * g.heads * g.head_dim) * nbytes
    return dense + (3 * batch * g.heads * seqlen * seqlen * 4 if scores else 0)  # scores, softmax, mask


def perplexity_parts(g: ModelGeometry, eval_config, env: EstimateEnv) -> dict[str, int]:
    bs, t = eval_config.batch_size, eval_config.seqlen
    return {"resident blocks": env.resident_block(g), "logits": 2 * bs * t * g.vocab * 4,
            "activations": act_bytes(g, bs, t, env.nbytes, scores=env.scores)}


def budget_bytes(budget: int | str) -> int:
    """A memory budget in bytes: a size text (``"24GB"``, :func:`parse_size`) or a number of bytes."""
    return parse_size(budget) if isinstance(budget, str) else int(budget)


def check_budget(estimate: MemoryEstimate, budget: int | str) -> None:
    """Raise ``MemoryError`` with the figure needed when ``estimate`` exceeds ``budget``."""
    limit = budget_bytes(budget)
    if estimate.total > limit:
        raise MemoryError(
            f"this run needs about {estimate.describe()}, more than the budget of {format_size(limit)}; "
            "lower nsamples/seqlen/batch sizes, group_size or max_terms (or the preset), use a bf16 model on CUDA, "
            "or raise --max-memory"
        )
    logger.info("memory estimate %s within the budget of %s", estimate.describe(), format_size(limit))
