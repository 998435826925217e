"""The modules a sliced (SliceGPT) model is made of.

* :class:`SlicedRMSNorm`: RMSNorm without a scale (folded into the next linear layers) whose
  mean runs over the *original* hidden size: ``x · rsqrt(Σx² / mean_dim + eps)``. A sliced
  stream keeps its principal directions, so its sum of squares is nearly the full one's
  (SliceGPT's ``RMSN``; the reference fixes eps at 1e-5, we keep the model's).
* :func:`make_sliced` turns a stock pre-norm decoder block into one with SliceGPT's shortcut
  matrices: ``h = x·Qa + attn(norm1(x))``, ``out = h·Qm + mlp(norm2(h))``. The block keeps its
  class's modules and names (the adapter still finds ``self_attn.q_proj``); only ``forward`` is
  replaced, through a subclass made once per block class, and the two matrices are parameters
  ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (the reference's names), saved with the weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# the linear roles that read the stream (after the attention / MLP norm) and that write it
ATTN_READERS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
MLP_READERS = ("gate_proj", "up_proj", "gate_up_proj")
WRITERS = {"o_proj": "attn", "down_proj": "mlp"}


class SlicedRMSNorm(nn.Module):
    """Scale-free RMSNorm over a sliced stream, normalised by the original width ``mean_dim``."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        var = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(var + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedBlockMixin:
    """``forward`` of a pre-norm block with shortcut matrices on both residual adds (None = identity)."""

    attn_shortcut_Q: nn.Parameter | None
    mlp_shortcut_Q: nn.Parameter | None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("a sliced block takes its hidden states positionally and everything else by keyword")
        norm1, attn, norm2, mlp = (getattr(self, n) for n in PARTS)
        a = attn(hidden_states=norm1(hidden_states), **kwargs)
        a = a[0] if isinstance(a, tuple) else a
        h = _through(hidden_states, self.attn_shortcut_Q) + a
        return _through(h, self.mlp_shortcut_Q) + mlp(norm2(h))


def _through(x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    return x if q is None else x @ q.to(x.dtype)


@functools.cache
def sliced_class(cls: type) -> type:
    """The sliced variant of a block class (one per class, so isinstance and deepcopy behave)."""
    if issubclass(cls, SlicedBlockMixin):
        return cls
    return type(f"Sliced{cls.__name__}", (SlicedBlockMixin, cls), {})


def make_sliced(block: nn.Module) -> nn.Module:
    """Give ``block`` the sliced forward and identity shortcuts (None), in place; returns it."""
    missing = [n for n in PARTS if not hasattr(block, n)]
    if missing:
        raise ConfigError(f"{type(block).__name__} has no {', '.join(missing)}: not a LLaMA-layout pre-norm block")
    if not isinstance(block, SlicedBlockMixin):
        block.__class__ = sliced_class(type(block))
        block.register_parameter("attn_shortcut_Q", None)
        block.register_parameter("mlp_shortcut_Q", None)
    return block


def is_sliced_block(block: nn.Module) -> bool:
    return isinstance(block, SlicedBlockMixin)


def set_shortcut(block: nn.Module, name: str, q: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Set ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (a parameter, or None = identity)."""
    setattr(block, name, None if q is None else nn.Parameter(q.to(dtype).contiguous()))


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits under ``root`` (ValueError when it is not there)."""
    for mod in root.modules():
        for name, child in mod.named_children():
            if child is old:
                setattr(mod, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not inside {type(root).__name__}")
