"""SliceGPT's computational-invariance pass: fold the norms, rotate the stream by PCA, slice it.

For each point of the residual stream (the embeddings' output; inside every block the stream
between attention and MLP, and the block's output) the calibration activations give
``H = Σ xᵀx`` (fp64, uncentred, damped by ``damp · mean(diag H)``); its eigenvectors Q, by
decreasing eigenvalue, rotate the stream so its first d' coordinates carry the most energy, and
every weight that writes the stream keeps the first d' rows (``Qᵀ W``), every weight that reads
it the first d' columns (``W Q``). The residual connection between two points with different
bases becomes the shortcut matrix ``Q_a[:, :d']ᵀ Q_b[:, :d']``. The signals are those of the
model as sliced so far (``rotate_and_slice_sequential`` of microsoft/TransformerCompression):
the PCA of a point sees the slicing of everything before it.

Needs pre-norm blocks (``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``), RMSNorms (a
LayerNorm's mean subtraction would have to be baked into the writers first: not done here),
and ``nn.Linear`` projections; :func:`check_sliceable` refuses anything else before any work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import FusegptError
from ..models import DecoderAdapter
from .modules import (
    ATTN_READERS,
    MLP_READERS,
    PARTS,
    WRITERS,
    SlicedRMSNorm,
    is_sliced_block,
    make_sliced,
    replace_module,
    set_shortcut,
)

logger = logging.getLogger(__name__)



class SliceError(FusegptError, ValueError):
    """The model's structure does not allow SliceGPT's rotation; the message says what and why."""


@dataclass
class SliceRecord:
    """What the pass did: dimensions per stream point and the energy the slicing kept there."""

    hidden: int
    dim: int
    head_dim: int
    embedding_kept: float = 0.0
    layers: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- checks
def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    raise SliceError(f"{type(norm).__name__} keeps its epsilon under no known name (variance_epsilon, eps)")


@torch.no_grad()
def rms_scale(norm: nn.Module, dim: int) -> torch.Tensor:
    """The per-channel scale s with ``norm(x) = x · rsqrt(mean(x²) + eps) · s`` (measured, so Gemma's
    ``1 + w`` is handled too); SliceError when the module is not such an RMSNorm."""
    eps = norm_eps(norm)
    p = next(norm.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    x = torch.randn(16, dim, generator=torch.Generator().manual_seed(0)).to(dev)
    y = norm(x.to(p.dtype if p is not None else torch.float32)).float()
    base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    s = (y * base).sum(0) / base.pow(2).sum(0)
    err = float((y - base * s).norm() / y.norm().clamp_min(1e-12))
    if err > 1e-3:
        raise SliceError(f"{type(norm).__name__} is not an RMSNorm (relative error {err:.2g} against x·rsqrt(mean x²)·s; "
                         "a LayerNorm's mean subtraction is not folded here, and a model sliced before cannot be "
                         "sliced again)")
    return s


def block_roles(adapter: DecoderAdapter, block: nn.Module) -> dict[str, nn.Linear]:
    roles = adapter.linear_roles(block)
    unknown = [r for r in roles if r not in (*ATTN_READERS, *MLP_READERS, *WRITERS)]
    bad = [r for r, m in roles.items() if not isinstance(m, nn.Linear)]
    if unknown or bad:
        raise SliceError(f"slicegpt handles LLaMA-layout blocks of nn.Linear projections; this block has "
                         f"{unknown or bad} ({type(block).__name__})")
    return roles


def check_layout(adapter: DecoderAdapter, block: nn.Module, index: int = 0) -> None:
    """Refuse a block without the LLaMA layout's norms, attention, MLP and linear projections, and a
    model that is sliced already."""
    if is_sliced_block(block) or adapter.embed_tokens.weight.shape[1] != adapter.config.hidden_size:
        raise SliceError("this model's stream is sliced already (SliceGPT); slice the unsliced model once, to the "
                         "final sparsity")
    block_roles(adapter, block)
    missing = [n for n in PARTS if not hasattr(block, n)]
    if missing:
        raise SliceError(f"block {index} ({type(block).__name__}) has no {', '.join(missing)}; slicegpt needs "
                         "LLaMA-layout pre-norm blocks")


@torch.no_grad()
def check_sliceable(adapter: DecoderAdapter, block: nn.Module, hidden: torch.Tensor, ctx, index: int) -> None:
    """Refuse a block whose stock forward is not the pre-norm form the sliced forward computes."""
    check_layout(adapter, block, index)
    ref = adapter.run_block(block, hidden, ctx, index)
    cls = block.__class__
    make_sliced(block)
    try:
        out = adapter.run_block(block, hidden, ctx, index)
    finally:
        block.__class__ = cls
        del block._parameters["attn_shortcut_Q"], block._parameters["mlp_shortcut_Q"]
    err = float((out - ref).float().norm() / ref.float().norm().clamp_min(1e-12))
    if err > 1e-4:
        raise SliceError(f"block {index} is not h = x + attn(norm(x)), out = h + mlp(norm(h)) (relative error "
                         f"{err:.2g}; e.g. Gemma 2/3's norms after the attention and FFN): its residual stream "
                         "cannot be rotated, so slicegpt cannot run on this family")


# ---------------------------------------------------------------------------- PCA and weight edits
def pca(chunks: list[torch.Tensor], damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of Σ xᵀx over all tokens, fp64, damped."""
    H = None
    for h in chunks:
        x = h.reshape(-1, h.shape[-1]).double()
        H = x.T @ x if H is None else H + x.T @ x
    assert H is not None
    H.diagonal().add_(damp * H.diagonal().mean())
    vals, vecs = torch.linalg.eigh(H)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def _new_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    new.weight.data.copy_(weight.to(lin.weight.dtype))
    if bias is not None:
        new.bias.data.copy_(bias.to(lin.weight.dtype))
    new.train(lin.training)
    return new


def read_rotated(lin: nn.Linear, q: torch.Tensor, scale: torch.Tensor | None = None) -> nn.Linear:
    """A reader of the stream in the basis ``q`` (columns kept): ``W diag(scale) q``; bias unchanged."""
    W = lin.weight.double()
    if scale is not None:
        W = W * scale.double().to(W.device)[None, :]
    return _new_linear(lin, W @ q.to(W.device), lin.bias.data if lin.bias is not None else None)


def write_rotated(lin: nn.Linear, q: torch.Tensor) -> nn.Linear:
    """A writer into the stream in the basis ``q``: ``qᵀ W`` (and ``qᵀ b``)."""
    q = q.to(lin.weight.device)
    W = q.T @ lin.weight.double()
    b = q.T @ lin.bias.double() if lin.bias is not None else None
    return _new_linear(lin, W, b)


def _kept(vals: torch.Tensor, d: int) -> float:
    return float(vals[:d].clamp_min(0).sum() / vals.clamp_min(0).sum())


# ---------------------------------------------------------------------------- the pass
@torch.no_grad()
def rotate_and_slice(adapter: DecoderAdapter, calib: torch.Tensor, dim: int, slice_head: bool = False,
                     damp: float = 0.01, batch_size: int = 8) -> SliceRecord:
    """Slice the residual stream of ``adapter``'s model to ``dim`` in place (block by block)."""
    model = adapter.model
    D = adapter.config.hidden_size
    if not 0 < dim <= D:
        raise SliceError(f"the sliced dimension must be in (0, {D}], got {dim}")
    chunks = [adapter.embed(ids.to(adapter.device)) for ids in calib.split(batch_size)]
    ctxs = adapter.contexts(chunks)
    L = adapter.num_layers
    with adapter.using([0]):
        check_sliceable(adapter, adapter.layers[0], chunks[0], ctxs[0], 0)
    head_scale = rms_scale(adapter.final_norm, D)
    head_eps = norm_eps(adapter.final_norm)
    dtype = adapter.dtype

    # the embeddings (untied from the head: the head reads the last block's basis)
    emb, head = adapter.embed_tokens, adapter.lm_head
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        replace_module(model, head, _new_linear(head, head.weight.data.clone(), head.bias.data if head.bias is not None
                                          else None))
        head = adapter.lm_head
    _untie_config(model)
    vals, q = pca(chunks, damp)
    rec = SliceRecord(hidden=D, dim=dim, head_dim=dim if slice_head else D, embedding_kept=_kept(vals, dim))
    q_in = q[:, :dim].to(adapter.device)
    emb.weight = nn.Parameter((emb.weight.double() @ q_in).to(dtype), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = dim
    for lin in adapter.stream_writers():  # e.g. LLaVA's projector writes image features into the stream
        replace_module(model, lin, write_rotated(lin, q_in))
    chunks = [(h.double() @ q_in).to(dtype) for h in chunks]

    bar = tqdm(range(L), desc="slicegpt blocks", unit="block")
    for i in bar:
        block = adapter.layers[i]
        d_out = dim if (slice_head or i < L - 1) else D
        with adapter.using([i], write=True):
            q_in, info = _slice_block(adapter, block, i, q_in, dim, d_out, chunks, ctxs, damp, D, dtype)
        chunks = info.pop("next")
        rec.layers.append({"layer": adapter.origin[i], **info})
    bar.close()
    replace_module(model, adapter.final_norm, SlicedRMSNorm(D, head_eps))
    replace_module(model, head, read_rotated(head, q_in, head_scale))
    return rec


def _slice_block(adapter: DecoderAdapter, block: nn.Module, i: int, q_in: torch.Tensor, dim: int, d_out: int,
                 chunks: list[torch.Tensor], ctxs: list, damp: float, D: int, dtype: torch.dtype):
    """Rotate and slice block ``i`` whose input stream is in basis ``q_in`` (D × d_in)."""
    norm1, _, norm2, _ = (getattr(block, n) for n in PARTS)
    s1, s2 = rms_scale(norm1, D), rms_scale(norm2, D)
    eps1, eps2 = norm_eps(norm1), norm_eps(norm2)
    roles = block_roles(adapter, block)
    # attention reads the input basis; the stream after attention is still in the original basis
    for r in roles:
        if r in ATTN_READERS:
            adapter.set_linear(block, r, read_rotated(roles[r], q_in, s1))
    replace_module(block, norm1, SlicedRMSNorm(D, eps1))
    make_sliced(block)
    set_shortcut(block, "attn_shortcut_Q", q_in.T, dtype)
    set_shortcut(block, "mlp_shortcut_Q", None, dtype)
    mids = _capture_input(adapter, block, norm2, chunks, ctxs, i)
    vals, q = pca(mids, damp)
    q_mid = q[:, :dim].to(q_in.device)
    mid_kept = _kept(vals, dim)
    del mids
    set_shortcut(block, "attn_shortcut_Q", q_in.T @ q_mid, dtype)
    adapter.set_linear(block, "o_proj", write_rotated(roles["o_proj"], q_mid))
    for r in roles:
        if r in MLP_READERS:
            adapter.set_linear(block, r, read_rotated(roles[r], q_mid, s2))
    replace_module(block, norm2, SlicedRMSNorm(D, eps2))
    set_shortcut(block, "mlp_shortcut_Q", q_mid.T, dtype)
    outs = [adapter.run_block(block, h, c, i) for h, c in zip(chunks, ctxs, strict=True)]
    vals, q = pca(outs, damp)
    q_out = q[:, :d_out].to(q_in.device)
    set_shortcut(block, "mlp_shortcut_Q", q_mid.T @ q_out, dtype)
    adapter.set_linear(block, "down_proj", write_rotated(roles["down_proj"], q_out))
    nxt = [(o.double() @ q_out).to(dtype) for o in outs]
    return q_out, {"attn_in": q_in.shape[1], "mid": dim, "out": d_out, "energy_kept_mid": round(mid_kept, 6),
                   "energy_kept_out": round(_kept(vals, d_out), 6), "next": nxt}


def _capture_input(adapter: DecoderAdapter, block: nn.Module, module: nn.Module, chunks, ctxs, i: int):
    """The input of ``module`` inside block ``i`` for every chunk (the block runs whole)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        for h, c in zip(chunks, ctxs, strict=True):
            adapter.run_block(block, h, c, i)
    finally:
        handle.remove()
    return seen


def _untie_config(model: nn.Module) -> None:
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
