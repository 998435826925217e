"""Up-front estimate of the peak memory a pruning run needs, from the config alone.

Resident runs peak at the whole model plus the largest working set of any step. Layer-wise runs
(``offload``, :mod:`fusegpt.offload`) keep only the non-block weights and add, per step, the blocks
it holds at once: one for scoring, OBS and perplexity; for group training the ``g`` blocks of the
group plus each student's stored copies of fused weights (up to ``max_terms`` per layer). With ``b`` the bytes per model value (4 for fp32, 2 for
bf16/fp16), ``P`` the parameter count, ``L`` blocks, ``h`` hidden size, ``I`` FFN width, ``H``
query heads, ``V`` vocabulary, ``P_blk`` parameters per block:

* **weights** ``= P·b``;
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
300 MB (Python, torch and transformers as loaded here). Checked against peak RSS on the embedded
SmolLM2-135M (MI scoring, one 512-token window, CPU): estimated 0.92 GB, measured 0.98 GB; and on
a random 1.2B LLaMA run layer-wise (benchmarks/RESULTS.md §5): 0.6–1.1 GB under for scoring,
perplexity and SlimGPT (the tokenizer and data pipeline outgrow the fixed runtime), 1.7 GB over for
FuseGPT (the fused-weight copies are shared in the first group).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

RUNTIME_BYTES = 300 * 10**6  # Python + torch + transformers, resident before any model
_UNITS = {"": 1e9, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5 TB"``, ``16`` (GB) → bytes."""
    if isinstance(text, (int, float)):
        return int(text * 1e9)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 24GB, 512MiB or 16 (GB)")
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
class _Geometry:
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


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if getattr(config, "model_type", "") == "llava":
            from transformers import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(config)


def _geometry(model_or_config) -> _Geometry:
    from .models import get_adapter

    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    a = get_adapter(model)
    block = a.layers[0]
    roles = a.linear_roles(block)
    return _Geometry(
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
    )


def _act(g: _Geometry, batch: int, seqlen: int, nbytes: int, scores: bool = True) -> int:
    dense = batch * seqlen * (4 * g.hidden + 3 * g.ffn + 3 * g.heads * g.head_dim) * nbytes
    return dense + (3 * batch * g.heads * seqlen * seqlen * 4 if scores else 0)  # scores, softmax, mask


def estimate_memory(model_or_config, configs, dtype: torch.dtype = torch.float32, device_type: str = "cpu",
                    eval_config=None, offload: bool = False) -> MemoryEstimate:
    """Estimate the peak memory of pruning ``model_or_config`` with ``configs`` (see the module doc).

    ``model_or_config``: a loaded model or just its config (a meta-device copy is built to count
    parameters; nothing is allocated). ``configs``: one method config or a chain. ``offload``:
    layer-wise execution, where only the non-block weights stay and each step adds the blocks it
    holds at once.
    """
    from .config import GroupTrainConfig, PruneConfig

    g = _geometry(model_or_config)
    b = torch.finfo(dtype).bits // 8
    sc = device_type != "cuda"  # attention scores materialised (CPU math / eager)
    blk = g.block_params * b if offload else 0  # one resident block (0: already in the weights)
    est = MemoryEstimate(weights=(g.params - g.blocks_params if offload else g.params) * b)
    configs = [configs] if isinstance(configs, PruneConfig) else list(configs)
    for cfg in configs:
        name = cfg.method
        if isinstance(cfg, GroupTrainConfig):
            r = cfg.resolved(device_type)
            calib = r["calib"]
            gs = min(r["group_size"], g.n_layers)
            terms = max(1, r.get("max_terms") or 1) if name == "fusegpt" else 0
            trainable = (gs - 1) * (r["lora_rank"] + terms * r.get("coef_rank", 0)) * g.roles_io
            est.steps[f"{name} MI ranking"] = {
                "resident blocks": blk,
                "cached states": (g.n_layers + 1) * cfg.mi_batch_size * calib.seqlen * g.hidden * b,
                "activations": _act(g, cfg.mi_batch_size, calib.seqlen, b, scores=sc),
            }
            est.steps[f"{name} group training"] = {
                # the group, plus each student's copies of fused weights (separate once stored)
                "resident blocks": blk * (gs + (gs - 1) * terms),
                "group inputs+targets": 2 * r["ft_nsamples"] * r["ft_seqlen"] * g.hidden * b,
                "trainable+Adam": 16 * trainable,
                "effective weights+grads": 2 * (gs - 1) * g.block_params * 4,
                "activations": (gs - 1) * _act(g, r["batch_size"], r["ft_seqlen"], 4, scores=sc),
            }
        elif name in ("slimgpt", "magnitude"):
            cal = cfg.calib
            widest = max(g.heads * g.head_dim, g.ffn)
            est.steps[name] = {
                "resident blocks": blk,
                "cached states": 0 if name == "magnitude" else 2 * cal.nsamples * cal.seqlen * g.hidden * b,
                # fp32 H + its fp64 copy and Cholesky factor at the peak of the inverse
                "Hessian": 0 if name == "magnitude" else 5 * widest * widest * 4,
                "activations": _act(g, getattr(cfg, "batch_size", 1), cal.seqlen, b, scores=sc),
            }
        else:  # block scorers
            cal = cfg.calib
            parts = {"resident blocks": blk, "cached states": (g.n_layers + 1) * cal.seqlen * g.hidden * b,
                     "activations": _act(g, 1, cal.seqlen, b, scores=sc)}
            if name == "sleb":
                parts["logits"] = cal.seqlen * g.vocab * 4
            est.steps[name] = parts
    if eval_config is not None:
        bs, t = eval_config.batch_size, eval_config.seqlen
        est.steps["perplexity"] = {"resident blocks": blk, "logits": 2 * bs * t * g.vocab * 4, "activations": _act(g, bs, t, b, scores=sc)}
    return est


def check_budget(estimate: MemoryEstimate, budget: int | str) -> None:
    """Raise ``MemoryError`` with the figure needed when ``estimate`` exceeds ``budget``."""
    limit = parse_size(budget) if isinstance(budget, str) else int(budget)
    if estimate.total > limit:
        raise MemoryError(
            f"this run needs about {estimate.describe()}, more than the budget of {format_size(limit)}; "
            "lower nsamples/seqlen/batch sizes, group_size or max_terms (or the preset), use a bf16 model on CUDA, "
            "or raise --max-memory"
        )
    logger.info("memory estimate %s within the budget of %s", estimate.describe(), format_size(limit))


def estimate_for_run(model_or_config, configs: Sequence, device: str = "cpu", eval_config=None,
                     offload: bool = False, dtype: torch.dtype | None = None) -> MemoryEstimate:
    """:func:`estimate_memory` with the dtype fusegpt loads in on ``device`` (fp32 on CPU, bf16 on CUDA)."""
    kind = torch.device(device).type
    dtype = dtype or (torch.float32 if kind == "cpu" else torch.bfloat16)
    return estimate_memory(model_or_config, configs, dtype=dtype, device_type=kind, eval_config=eval_config,
                           offload=offload)


def plan_offload(model_or_config, configs: Sequence, budget: int | str, device: str = "cpu", eval_config=None,
                 offload: str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Honour a memory ``budget``: the offload storage to use (None: all resident), or MemoryError.

    With ``offload`` already chosen the layer-wise estimate must fit. Otherwise the model stays
    resident when it fits, and goes layer-wise (blocks on disk) when only that fits; when neither
    fits, the error gives both figures.
    """
    limit = parse_size(budget) if isinstance(budget, str) else int(budget)
    layerwise = estimate_for_run(model_or_config, configs, device, eval_config, offload=True, dtype=dtype)
    if offload is None:
        resident = estimate_for_run(model_or_config, configs, device, eval_config, dtype=dtype)
        if resident.total <= limit:
            logger.info("memory estimate %s within the budget of %s", resident.describe(), format_size(limit))
            return None
        if layerwise.total <= limit:
            logger.warning("the model does not fit in %s resident (%s); running layer-wise with blocks on disk (%s)",
                           format_size(limit), format_size(resident.total), layerwise.describe())
            return "disk"
        raise MemoryError(
            f"this run needs about {resident.describe()} resident, and about {layerwise.describe()} layer-wise "
            f"(--offload disk), both more than the budget of {format_size(limit)}; lower nsamples/seqlen/batch sizes, "
            "group_size or max_terms (or the preset), use a bf16 model on CUDA, or raise --max-memory")
    check_budget(layerwise, limit)
    return offload
