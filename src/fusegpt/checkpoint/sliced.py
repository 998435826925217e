"""Checkpoints of SliceGPT models: the sliced stream's dimensions in the config.

A sliced model is no stock architecture: its embeddings, norms and projections read and write a
stream narrower than ``config.hidden_size``, its norms have no scale, and each block carries two
shortcut matrices (``attn_shortcut_Q``, ``mlp_shortcut_Q``) on its residual adds. Stock
``transformers`` has no module for those matrices, so such a checkpoint cannot be loaded by
``AutoModelForCausalLM``: :func:`fusegpt.load_pruned` rebuilds it. The config keeps the original
``hidden_size`` (the rotary tables, head size and the norms' mean width use it) and gains
``fusegpt_sliced`` = ``{"format": 1, "hidden_size": D, "embedding": d, "layers": [[d_in, d_mid,
d_out], …], "head": d_head, "eps": ε}``, next to ``fusegpt_widths`` when heads or FFN channels were
pruned too; ``model_type`` becomes the marker of :mod:`fusegpt.checkpoint.width`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLoadError
from ..models import DecoderAdapter
from ..slicing.modules import (
    ATTN_READERS,
    MLP_READERS,
    PARTS,
    SlicedRMSNorm,
    is_sliced_block,
    make_sliced,
    replace_module,
    set_shortcut,
)

SLICED_KEY = "fusegpt_sliced"
FORMAT = 1


def is_sliced_model(adapter: DecoderAdapter) -> bool:
    return any(is_sliced_block(b) for b in adapter.layers)


def sliced_layout(adapter: DecoderAdapter) -> dict | None:
    """The dimensions :func:`apply_sliced_layout` needs to rebuild the model (None if not sliced)."""
    if not is_sliced_model(adapter):
        return None
    layers = []
    for block in adapter.layers:
        r = adapter.linear_roles(block)
        d_in = next(r[n].in_features for n in ATTN_READERS if n in r)
        layers.append([d_in, r["o_proj"].out_features, r["down_proj"].out_features])
    eps = adapter.layers[0].input_layernorm.eps
    return {"format": FORMAT, "hidden_size": adapter.config.hidden_size,
            "embedding": adapter.embed_tokens.weight.shape[1], "layers": layers,
            "head": adapter.lm_head.in_features, "eps": eps,
            "stream_writers": [lin.out_features for lin in adapter.stream_writers()],
            "note": "a SliceGPT model (rotated, sliced stream with shortcut matrices); load with fusegpt.load_pruned"}


def _resized(lin: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    return nn.Linear(in_features or lin.in_features, out_features or lin.out_features, bias=lin.bias is not None,
                     device=lin.weight.device, dtype=lin.weight.dtype)


def apply_sliced_layout(adapter: DecoderAdapter, layout: dict) -> None:
    """Give the (stock, freshly built) model the sliced structure, with uninitialised weights."""
    if layout.get("format", FORMAT) > FORMAT:
        raise ModelLoadError(f"sliced format {layout['format']} is newer than this fusegpt reads; upgrade fusegpt")
    if len(layout["layers"]) != adapter.num_layers:
        raise ModelLoadError(f"{SLICED_KEY} lists {len(layout['layers'])} layers but the config has {adapter.num_layers}")
    D, eps = layout["hidden_size"], layout["eps"]
    emb = adapter.embed_tokens
    emb.weight = nn.Parameter(torch.empty(emb.weight.shape[0], layout["embedding"], dtype=emb.weight.dtype,
                                          device=emb.weight.device))
    emb.embedding_dim = layout["embedding"]
    dtype = emb.weight.dtype
    for block, (d_in, d_mid, d_out) in zip(adapter.layers, layout["layers"], strict=True):
        r = adapter.linear_roles(block)
        for name, lin in r.items():
            if name in ATTN_READERS:
                adapter.set_linear(block, name, _resized(lin, in_features=d_in))
            elif name in MLP_READERS:
                adapter.set_linear(block, name, _resized(lin, in_features=d_mid))
            elif name == "o_proj":
                adapter.set_linear(block, name, _resized(lin, out_features=d_mid))
            else:
                adapter.set_linear(block, name, _resized(lin, out_features=d_out))
        for part in (PARTS[0], PARTS[2]):
            setattr(block, part, SlicedRMSNorm(D, eps))
        make_sliced(block)
        set_shortcut(block, "attn_shortcut_Q", torch.empty(d_in, d_mid), dtype)
        set_shortcut(block, "mlp_shortcut_Q", torch.empty(d_mid, d_out), dtype)
    for lin, d in zip(adapter.stream_writers(), layout.get("stream_writers", []), strict=False):
        replace_module(adapter.model, lin, _resized(lin, out_features=d))
    replace_module(adapter.model, adapter.final_norm, SlicedRMSNorm(D, eps))
    head = adapter.lm_head
    replace_module(adapter.model, head, _resized(head, in_features=layout["head"]))
