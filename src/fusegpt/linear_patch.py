"""LinearPatch (Chen et al., NeurIPS 2025; chenxinrui-tsinghua/LinearPatch): a training-free repair of
each interface where blocks were removed.

Where a span of blocks ``s … e−1`` is gone, block ``e`` now reads the state that entered block ``s``,
whose per-channel magnitudes differ from what it was trained on, and a few special tokens (the
attention sink) carry outliers ~10³ larger than the rest. The patch is one symmetric matrix

    P = H · diag(d) · Hᵀ,   d_c = mean over windows of  mean_t |(x_e H)_c| / mean_t |(x_s H)_c|

on the stream entering the first kept block after the span (:class:`fusegpt.patching.StreamPatch`):
``H`` a normalised Hadamard matrix rotates the stream so the outliers spread over every channel, ``d``
aligns the rotated magnitudes with those the dense model had at ``e``, ``Hᵀ`` rotates back. ``x_s`` /
``x_e`` are the dense model's states entering blocks ``s`` and ``e`` on calibration windows (the
reference's ``get_scale_params``: hooks on the blocks' inputs, the ratio per window, averaged; 128
windows of 2,048 tokens there). With ``d = 1`` the patch is the identity (H is orthogonal).

The statistics of every block boundary are taken once, on the model as it is before the step
(:func:`boundary_stats`), so the patch of any span the step ends up removing comes from them
(:func:`patch_matrix`); a step that removes scattered blocks (SLEB) gets one patch per run.

Hadamard matrices (:func:`hadamard`): Sylvester's construction times a Paley one (orders q+1 for a
prime q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4), which covers the hidden sizes of LLaMA (4096, 5120),
SmolLM2 (576 = 36·16), Gemma 3 270M (640 = 20·32), Qwen2-0.5B (896 = 224·4); another size gets a
seeded random orthogonal matrix instead, and the record says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from .linear_map import contiguous_runs
from .models import DecoderAdapter
from .patching import attach_patch

logger = logging.getLogger(__name__)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _paley(q: int) -> torch.Tensor:
    """A Hadamard matrix from the prime ``q``: order q+1 (q ≡ 3 mod 4) or 2(q+1) (q ≡ 1 mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if q % 4 == 3:  # Paley I: H = I + S with S skew (core Q bordered)
        S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return torch.eye(q + 1, dtype=torch.float64) + S
    # Paley II: C symmetric conference matrix of order q+1, then H = C ⊗ [[1,1],[1,-1]] + I ⊗ [[1,-1],[-1,-1]]
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = ones[:, 0]
    C[1:, 1:] = Q
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard(n: int) -> torch.Tensor | None:
    """A normalised (orthogonal) Hadamard matrix of order ``n`` in fp64, or None when none is built here."""
    for k in range(int(math.log2(n)) + 1):
        m, rem = divmod(n, 2 ** k)
        if rem:
            break
        core = None
        if m == 1:
            core = torch.ones(1, 1, dtype=torch.float64)
        elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            core = _paley(m - 1)
        elif m % 4 == 0 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            core = _paley(m // 2 - 1)
        if core is not None:
            H = torch.kron(_sylvester(2 ** k), core)
            return H / math.sqrt(n)
    return None


def rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The patch's rotation: a Hadamard matrix, else a seeded random orthogonal matrix; and which it is."""
    H = hadamard(n)
    if H is not None:
        return H, "hadamard"
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "random orthogonal"


@torch.no_grad()
def boundary_stats(adapter: DecoderAdapter, windows: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``(L+1, N, d)``: per window, the mean over tokens of ``|x_i R|`` for every boundary ``i`` (the state
    entering block ``i``; ``i = L`` the last block's output, before the final norm)."""
    L, n, d = adapter.num_layers, windows.shape[0], adapter.config.hidden_size
    out = torch.zeros(L + 1, n, d, dtype=torch.float64)
    Rd = R.to(adapter.device, torch.float32)
    for w, ids in enumerate(windows.split(1)):
        h = adapter.embed(ids.to(adapter.device))
        ctx = adapter.context(h)
        for i in range(L + 1):
            out[i, w] = (h.float() @ Rd).abs().mean(dim=(0, 1)).double().cpu()
            if i < L:
                with adapter.using([i]):
                    h = adapter.run_block(adapter.layers[i], h, ctx, i)
    return out


def patch_matrix(stats: torch.Tensor, s: int, e: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, d)`` for the span ``s … e−1``: ``d`` = the mean per-window ratio of rotated magnitudes."""
    d = (stats[e] / stats[s].clamp_min(1e-12)).mean(0)
    return R @ torch.diag(d) @ R.T, d


def apply_patches(adapter: DecoderAdapter, origin_before: Sequence[int], removed_origin: Sequence[int],
                  stats: torch.Tensor, R: torch.Tensor, kind: str) -> list[dict]:
    """Attach a patch after every run of ``removed_origin`` (original indices of blocks this step removed);
    ``origin_before``: the original index of each block when ``stats`` were taken. Returns the records."""
    pos = {o: i for i, o in enumerate(origin_before)}
    removed = [pos[o] for o in removed_origin if o in pos]
    now = {o: i for i, o in enumerate(adapter.origin)}
    records = []
    for s, e in contiguous_runs(removed):
        P, d = patch_matrix(stats, s, e, R)
        if e < len(origin_before):
            target = adapter.layers[now[origin_before[e]]]
            where = f"block {origin_before[e]} (original index)"
        else:
            target = adapter.final_norm
            where = "the final norm"
        attach_patch(target, P.to(torch.float32))
        records.append({"span": [origin_before[i] for i in range(s, e)], "before": where, "rotation": kind,
                        "scale_mean": float(d.mean()), "scale_min": float(d.min()), "scale_max": float(d.max())})
        logger.info("LinearPatch before %s for removed blocks %s: scales %.3f..%.3f (mean %.3f)", where,
                    records[-1]["span"], d.min(), d.max(), d.mean())
    return records
