"""Replacing a span of blocks by one linear map (ReplaceMe), folded into the block before it.

For a span of blocks ``s … e−1`` (current indices, ``s ≥ 1``) and its predecessor ``p = s − 1``,
write the predecessor's output as ``Y + M``: ``M`` is its MLP output (the down projection's
output) and ``Y`` everything else (its input plus its attention output). ReplaceMe
(Shopkhoev et al., 2025) removes the span and looks for the map ``T`` (hidden × hidden) with
``M·T + Y ≈ L``, ``L`` = the span's output (the input of block ``e``), on calibration tokens:

* ``ls``: least squares in fp64, ``T = (MᵀM + αI)⁻¹ Mᵀ(L − Y)`` (``α = ridge ·`` the mean diagonal of
  ``MᵀM``, so ``ridge`` does not depend on the activations' scale; the reference's α is absolute; 0 in
  the paper and by default),
  from ``MᵀM`` and ``Mᵀ(L − Y)`` accumulated over the windows (nothing per token is kept);
* ``cosine``: the paper's alternative, ``min 1 − cos(M·T + Y, L)`` per token by Adam from
  ``T = I`` (reference: lr 1e-4, 10 epochs, 1,024 tokens a batch), which keeps ``M``, ``Y``,
  ``L`` of every calibration token.

``T`` is folded into the predecessor's down projection (``W ← Tᵀ·W``, bias ``b ← Tᵀ·b``), so the
model keeps its parameter count and stays a stock checkpoint. Spans are chosen by the angular
distance ``arccos(cos(h_s, h_e))/π`` between the hidden states entering the span's first block
and leaving its last, averaged over calibration tokens (:func:`span_distances`), or, not in the
paper, by the residual of each candidate's least-squares fit (:func:`span_residuals`).

Everything runs block by block over all windows (``adapter.using``), so under ``--offload`` only
the block being run is on the device; the states kept between blocks are ``length + 1``
boundaries of the calibration windows for the distances, and ``M``/``Y`` of the windows between a
predecessor and its span's end for the fit.

The fold assumes a block's output is ``Y + down_proj(…)`` (LLaMA, Mistral, Qwen2/3, LLaVA's
language tower). :func:`fit_spans` checks this on the first window by doubling the down
projection's output, and refuses families where it does not hold (e.g. a norm after the FFN).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, FusegptError
from .models import DecoderAdapter

logger = logging.getLogger(__name__)

SOLVERS = ("ls", "cosine")


class LinearMapError(FusegptError, ValueError):
    """The linear replacement cannot be applied to this model; the message says why."""


def check_map_tokens(tokens: int, hidden: int, ridge: float, what: str, windows: str) -> None:
    """A least-squares map of ``hidden`` × ``hidden`` needs at least ``hidden`` calibration tokens; with
    fewer (and no ``ridge``) it fits the tokens exactly, reports residual 0 and destroys the model."""
    if tokens < hidden and ridge <= 0:
        raise ConfigError(f"{what}: a least-squares map of the {hidden}-wide hidden state fitted on {tokens} tokens "
                          f"({windows}) is underdetermined (it needs at least {hidden}; several times more to "
                          "generalise): give more windows, or regularise it (--set ridge=0.01)")


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / π`` along the last dimension, in [0, 1]."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


@torch.no_grad()
def span_distances(adapter: DecoderAdapter, calib: torch.Tensor, lengths: Sequence[int], batch_size: int = 1,
                   last_token: bool = False) -> dict[int, torch.Tensor]:
    """``{n: d}`` with ``d[s]`` = mean angular distance between the states entering block ``s`` and
    block ``s + n`` (``s = 0 … L − n``), over every calibration token (or each window's last token).

    A resident model runs window by window (``max(lengths) + 1`` boundaries of one window are kept);
    an offloaded one block by block over all windows (the same boundaries of every window).
    """
    n_layers = adapter.num_layers
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 1 or lengths[-1] > n_layers:
        raise ValueError(f"span lengths {lengths} must lie in 1..{n_layers}")
    sums = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64) for n in lengths}

    def pick(hs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h[:, -1:] for h in hs] if last_token else hs

    def walk(chunks: list[torch.Tensor], ctxs: list) -> None:
        ring: deque[list[torch.Tensor]] = deque([pick(chunks)], maxlen=lengths[-1] + 1)
        for i in range(n_layers):
            with adapter.using([i]):
                chunks = [adapter.run_block(adapter.layers[i], h, c, i) for h, c in zip(chunks, ctxs, strict=True)]
            ring.append(pick(chunks))
            for n in lengths:
                if i + 1 >= n:  # boundary i+1 against boundary i+1-n
                    sums[n][i + 1 - n] += sum(float(angular_distance(a, b).sum())
                                              for a, b in zip(ring[-1 - n], ring[-1], strict=True))

    _walk_windows(adapter, calib, batch_size, walk)
    count = calib.shape[0] if last_token else calib.numel()
    return {n: s / count for n, s in sums.items()}


@torch.no_grad()
def span_residuals(adapter: DecoderAdapter, calib: torch.Tensor, lengths: Sequence[int], ridge: float = 0.0,
                   batch_size: int = 1) -> dict[int, torch.Tensor]:
    """``{n: r}`` with ``r[s]`` = the relative residual ``‖M·T − (L − Y)‖ / ‖L − Y‖`` of the least-squares
    map for the span ``s … s+n−1`` (``s = 1 … L − n``; ``r[0]`` = inf: no predecessor), every span from
    one pass: the fit ReplaceMe will make, for every candidate, instead of the angular distance.

    Per predecessor ``p`` it accumulates ``MᵀM`` and, per length, ``Mᵀ(L − Y)`` and ``‖L − Y‖²``
    (fp64, hidden² each); the minimum is ``‖L − Y‖² − tr(Bᵀ(MᵀM + αI)⁻¹B)``. The windows run one at
    a time when resident (the last ``max(n)+1`` blocks' ``M``, ``Y`` of one window are kept), block by
    block over all windows when offloaded.
    """
    n_layers = adapter.num_layers
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 1 or lengths[-1] >= n_layers:
        raise ValueError(f"span lengths {lengths} must lie in 1..{n_layers - 1}")
    hidden = adapter.config.hidden_size
    gram = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(n_layers)]
    cross = {n: [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(n_layers - n)] for n in lengths}
    rr = {n: torch.zeros(n_layers - n, dtype=torch.float64) for n in lengths}
    no_pred: set[int] = set()

    def walk(chunks: list[torch.Tensor], ctxs: list) -> None:
        ring: deque[list[tuple[torch.Tensor, torch.Tensor]]] = deque(maxlen=lengths[-1] + 1)
        for i in range(n_layers):
            block = adapter.layers[i]
            with adapter.using([i]):
                try:
                    cap: _Capture | None = _Capture(_down_proj(adapter, block))
                except LinearMapError:  # no down projection: no span can start after it
                    cap = None
                    no_pred.add(i)
                try:
                    outs, pairs = [], []
                    for h, c in zip(chunks, ctxs, strict=True):
                        out = adapter.run_block(block, h, c, i)
                        m = cap.out.to(out.device) if cap is not None else torch.zeros_like(out)
                        outs.append(out)
                        pairs.append((m.reshape(-1, hidden).double().cpu(), (out - m).reshape(-1, hidden).double().cpu()))
                finally:
                    if cap is not None:
                        cap.remove()
            chunks = outs
            for m, _ in pairs:
                gram[i] += m.T @ m
            ring.append(pairs)
            for n in lengths:
                p = i - n  # block i ends the span p+1 … i
                if p >= 0:
                    for (m, y), out in zip(ring[-1 - n], outs, strict=True):
                        r = out.reshape(-1, hidden).double().cpu() - y
                        cross[n][p] += m.T @ r
                        rr[n][p] += (r * r).sum()

    _walk_windows(adapter, calib, batch_size, walk)
    eye = torch.eye(hidden, dtype=torch.float64)
    out: dict[int, torch.Tensor] = {}
    for n in lengths:
        res = torch.full((n_layers - n + 1,), float("inf"), dtype=torch.float64)
        for p in range(n_layers - n):
            if p in no_pred:
                continue
            a = gram[p] + ridge * float(torch.trace(gram[p])) / hidden * eye
            b = cross[n][p]
            explained = torch.trace(b.T @ torch.linalg.lstsq(a, b).solution)
            res[p + 1] = torch.sqrt((rr[n][p] - explained).clamp_min(0) / rr[n][p].clamp_min(1e-300))
        out[n] = res
    return out


def _walk_windows(adapter: DecoderAdapter, calib: torch.Tensor, batch_size: int, walk) -> None:
    """Call ``walk(chunks, contexts)`` once per window when resident (little memory), once over all windows
    when offloaded (each block is brought in once)."""
    windows = [ids.to(adapter.device) for ids in calib.split(batch_size)]
    if adapter.offloader is None:
        for ids in windows:
            h = adapter.embed(ids)
            walk([h], adapter.contexts([h]))
    else:
        chunks = [adapter.embed(ids) for ids in windows]
        walk(chunks, adapter.contexts(chunks))


@dataclass
class SpanFit:
    """One replaced span: blocks ``start … end−1`` (current indices), its map and how well it fits."""

    start: int
    end: int
    transform: torch.Tensor | None = None  # hidden × hidden, fp64; applied as M·T
    residual: float = float("nan")  # ‖M·T − (L − Y)‖ / ‖L − Y‖ on the calibration tokens
    residual_identity: float = float("nan")  # the same with T = I: plain removal
    distance: float = float("nan")  # mean angular distance between the span's input (Y + M) and output L
    info: dict = field(default_factory=dict)


def _down_proj(adapter: DecoderAdapter, block: nn.Module) -> nn.Module:
    try:
        roles = adapter.linear_roles(block)
    except AttributeError:  # a block without the family's modules (a custom or foreign block)
        raise LinearMapError(f"{type(block).__name__} has none of the adapter's linear roles; linear replacement "
                             "needs a LLaMA-style MLP (down_proj)") from None
    if "down_proj" not in roles:
        raise LinearMapError(f"{type(block).__name__} has no down projection role; linear replacement needs a "
                             "LLaMA-style MLP (down_proj)")
    return roles["down_proj"]


class _Capture:
    """Forward hook on a down projection: records its output, optionally scales it."""

    def __init__(self, module: nn.Module):
        self.out: torch.Tensor | None = None
        self.scale = 1.0
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module, _inputs, output):
        self.out = output.detach()
        return output * self.scale if self.scale != 1.0 else output

    def remove(self) -> None:
        self.handle.remove()


def _check_residual_form(adapter: DecoderAdapter, block: nn.Module, cap: _Capture, h: torch.Tensor, ctx,
                         index: int, out: torch.Tensor) -> None:
    """The block's output must be ``Y + M`` with M the down projection's output (one extra forward)."""
    m = cap.out
    cap.scale = 2.0
    try:
        out2 = adapter.run_block(block, h, ctx, index)
    finally:
        cap.scale = 1.0
    err = (out2 - out - m).float().norm() / (m.float().norm() + 1e-12)
    if err > 1e-3:
        raise LinearMapError(f"block {index}'s output is not its input stream plus its down projection's output "
                             f"(relative error {float(err):.2g}; e.g. a norm after the FFN): the linear map cannot "
                             "be folded into it")


@torch.no_grad()
def fit_spans(adapter: DecoderAdapter, calib: torch.Tensor, spans: Sequence[tuple[int, int]], solver: str = "ls",
              ridge: float = 0.0, batch_size: int = 1, cosine_epochs: int = 10, cosine_lr: float = 1e-4,
              cosine_batch: int = 1024, cosine_init: str = "identity", seed: int = 0) -> list[SpanFit]:
    """Fit one map per span (non-overlapping, not adjacent, each ``start ≥ 1``) on the current model,
    in one block-by-block pass that stops at the last span's end."""
    if solver not in (*SOLVERS, "identity"):
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} or identity, got {solver!r}")
    spans = sorted(spans)
    for (s, e), nxt in zip(spans, spans[1:] + [(adapter.num_layers + 1, 0)], strict=True):
        if not 1 <= s < e <= adapter.num_layers or e >= nxt[0]:
            raise ValueError(f"spans {spans} must be non-overlapping, non-adjacent, start at block 1 or later")
    fits = [SpanFit(s, e) for s, e in spans]
    by_pred = {f.start - 1: f for f in fits}
    by_end = {f.end - 1: f for f in fits}
    held: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # span start -> per chunk (M, Y)
    chunks = [adapter.embed(ids.to(adapter.device)) for ids in calib.split(batch_size)]
    ctxs = adapter.contexts(chunks)
    for i in range(spans[-1][1]):
        block = adapter.layers[i]
        with adapter.using([i]):
            if i in by_pred:
                cap = _Capture(_down_proj(adapter, block))
                try:
                    pairs, nxt = [], []
                    for j, (h, c) in enumerate(zip(chunks, ctxs, strict=True)):
                        out = adapter.run_block(block, h, c, i)
                        if j == 0:
                            _check_residual_form(adapter, block, cap, h, c, i, out)
                        m = cap.out.to(out.device)
                        pairs.append((m, out - m))
                        nxt.append(out)
                finally:
                    cap.remove()
                held[by_pred[i].start] = pairs
                chunks = nxt
            else:
                chunks = [adapter.run_block(block, h, c, i) for h, c in zip(chunks, ctxs, strict=True)]
        if i in by_end:
            fit = by_end[i]
            _solve(fit, held.pop(fit.start), chunks, solver, ridge, cosine_epochs, cosine_lr, cosine_batch,
                   cosine_init, seed)
    return fits


def _solve(fit: SpanFit, pairs: list[tuple[torch.Tensor, torch.Tensor]], outs: list[torch.Tensor], solver: str,
           ridge: float, cosine_epochs: int, cosine_lr: float, cosine_batch: int, cosine_init: str, seed: int) -> None:
    """Fill ``fit`` from the span's ``(M, Y)`` per chunk and its outputs ``L``: normal equations in fp64,
    the map, its residuals, the span's distance."""
    hidden = outs[0].shape[-1]
    a = torch.zeros(hidden, hidden, dtype=torch.float64)
    b = torch.zeros(hidden, hidden, dtype=torch.float64)
    rr = torch.zeros((), dtype=torch.float64)
    dist, count = 0.0, 0
    rows = []  # cosine: (M, Y, L) of every token
    for (m, y), lo in zip(pairs, outs, strict=True):
        m2 = m.reshape(-1, hidden).double().cpu()
        r2 = (lo - y).reshape(-1, hidden).double().cpu()
        a += m2.T @ m2
        b += m2.T @ r2
        rr += (r2 * r2).sum()
        dist += float(angular_distance(y + m, lo).sum())
        count += m2.shape[0]
        if solver == "cosine":
            rows.append((m.reshape(-1, hidden).float().cpu(), y.reshape(-1, hidden).float().cpu(),
                         lo.reshape(-1, hidden).float().cpu()))
    eye = torch.eye(hidden, dtype=torch.float64)
    alpha = ridge * float(torch.trace(a)) / hidden  # relative to the mean diagonal of MᵀM
    if alpha <= 0 and (solver == "ls" or (solver == "cosine" and cosine_init == "ls")):
        rank = int(torch.linalg.matrix_rank(a))
        if rank < hidden:  # an exact fit of the calibration tokens: residual 0, a destroyed model
            raise LinearMapError(
                f"the least-squares map for blocks {fit.start}-{fit.end - 1} is underdetermined: the {count} "
                f"calibration tokens span only {rank} of the {hidden} hidden dimensions; give more calibration "
                "windows, or regularise the fit (--set ridge=0.01)")
    if solver == "identity":  # no map: the span is simply removed (the ablation)
        t = eye
    elif solver == "ls":
        t = torch.linalg.solve(a + alpha * eye, b)
    else:
        init = torch.linalg.solve(a + alpha * eye, b) if cosine_init == "ls" else eye
        t, fit.info["cosine_loss"] = _fit_cosine(rows, init, cosine_epochs, cosine_lr, cosine_batch, seed)
    fit.transform = t
    sq = torch.trace(t.T @ a @ t) - 2 * torch.trace(t.T @ b) + rr
    fit.residual = float(torch.sqrt(sq.clamp_min(0) / rr))
    fit.residual_identity = float(torch.sqrt((torch.trace(a) - 2 * torch.trace(b) + rr).clamp_min(0) / rr))
    fit.distance = dist / count


@torch.enable_grad()
def _fit_cosine(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], init: torch.Tensor, epochs: int,
                lr: float, batch: int, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """``min 1 − cos(M·T + Y, L)`` by Adam over shuffled token batches (the reference's cosine variant);
    returns ``T`` and the mean cosine loss before and after."""
    m = torch.cat([r[0] for r in rows])
    y = torch.cat([r[1] for r in rows])
    lo = torch.cat([r[2] for r in rows])
    t = nn.Parameter(init.float().clone())
    opt = torch.optim.Adam([t], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(1 - F.cosine_similarity(m @ t + y, lo, dim=-1).mean())

    before = mean_loss()
    for _ in range(epochs):
        for idx in torch.randperm(m.shape[0], generator=g).split(batch):
            opt.zero_grad()
            pred = m[idx] @ t + y[idx]
            loss = 1 - F.cosine_similarity(pred, lo[idx], dim=-1).mean()
            loss.backward()
            opt.step()
    return t.detach().double(), {"before": before, "after": mean_loss()}


@torch.no_grad()
def fold_into_predecessor(adapter: DecoderAdapter, index: int, transform: torch.Tensor) -> None:
    """``down_proj`` of block ``index``: ``W ← Tᵀ·W`` (and ``b ← Tᵀ·b``), computed in fp64."""
    block = adapter.layers[index]
    with adapter.using([index], write=True):
        down = _down_proj(adapter, block)
        if type(down) is not nn.Linear:
            to_linear = getattr(down, "to_linear", None)
            if to_linear is None:
                raise LinearMapError(f"block {index}'s down projection is a {type(down).__name__}; merge it first")
            down = to_linear()
            adapter.set_linear(block, "down_proj", down)
        tt = transform.T.to(device=down.weight.device)
        down.weight.copy_((tt @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((tt @ down.bias.double()).to(down.bias.dtype))


def contiguous_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` runs of consecutive indices: [3, 4, 7] → [(3, 5), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
