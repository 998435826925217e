"""Rough time estimates: count the floating-point work of a run, divide by the device's rate.

The rate is measured once per device with a dense matmul the size of a block's widest
projection (:func:`measure_flops`, about a quarter of a second), then discounted by
``EFFICIENCY``: a decoder block on a batch of one window reaches only part of the matmul peak
(attention, norms, activations, Python). The constants were set from runs of the embedded
SmolLM2-135M on this project's 2-core CPU (benchmarks/RESULTS.md); estimates are meant to tell
minutes from hours, not to be exact.
"""

from __future__ import annotations

import functools
import time

import torch

from .memory import EstimateEnv, ModelGeometry

EFFICIENCY = {"cpu": 0.6, "cuda": 0.35}  # share of the matmul rate a block forward reaches
BACKWARD = 2.5  # a backward pass (with the fused layers' effective weights) costs about 2.5 forwards
HEAD_EFFICIENCY = 2.0  # the LM head is one large matmul: about twice a block's share of the peak


@functools.cache
def measure_flops(device: str = "cpu") -> float:
    """Dense fp32 (CPU) / bf16 (CUDA) matmul rate of ``device`` in FLOP/s."""
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    n, k, m = 512, 1024, 1024
    a = torch.randn(n, k, device=dev, dtype=dtype)
    b = torch.randn(k, m, device=dev, dtype=dtype)
    reps, elapsed = 0, 0.0
    a @ b  # warm-up
    t0 = time.perf_counter()
    while elapsed < 0.25:
        for _ in range(4):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        reps += 4
        elapsed = time.perf_counter() - t0
    return 2.0 * n * k * m * reps / elapsed


def block_flops(g: ModelGeometry, tokens: int, seqlen: int) -> float:
    """Forward FLOPs of one block on ``tokens`` tokens in windows of ``seqlen`` (weights + attention)."""
    return 2.0 * tokens * (g.block_params + 2 * seqlen * g.heads * g.head_dim)


def head_flops(g: ModelGeometry, tokens: int) -> float:
    """Forward FLOPs of the LM head on ``tokens`` tokens, in block-equivalent units (divided by
    ``HEAD_EFFICIENCY``: it runs nearer the matmul peak than a block does)."""
    return 2.0 * tokens * g.vocab * g.hidden / HEAD_EFFICIENCY


def seconds(flops: float, env: EstimateEnv) -> float:
    return flops / (env.flops_per_s * EFFICIENCY.get(env.device_type, 0.35))


def perplexity_seconds(g: ModelGeometry, tokens: int, seqlen: int, env: EstimateEnv) -> float:
    """One pass of the whole model over ``tokens`` evaluation tokens."""
    return seconds(g.n_layers * block_flops(g, tokens, seqlen) + head_flops(g, tokens), env)


def format_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
