"""LinearPatch's module: a d×d matrix on the residual stream where blocks were removed.

A :class:`StreamPatch` is attached to the first kept block after a removed span (or to the final norm
when the span ended the model) and multiplies the hidden state entering it: ``x ↦ x·P``. It is a
registered submodule (``<block>.fusegpt_patch.weight``), so it moves with its block, is saved in the
checkpoint's weights and is trained like any parameter; a forward pre-hook applies it.

It cannot be folded into the neighbouring weights of a pre-norm decoder: ``P`` multiplies the whole
stream (the residual carried from every earlier block, not just one projection's output), and every
later RMSNorm divides by ``‖x·P‖``, which no weight after it can undo. So a patched model is saved as a
``load_pruned`` checkpoint (``fusegpt_patches`` in its config: which blocks carry a patch), and GGUF
export refuses it (no llama.cpp architecture has the extra matrix).
"""

from __future__ import annotations

import torch
from torch import nn

PATCH_ATTR = "fusegpt_patch"
PATCH_KEY = "fusegpt_patches"  # config key of a patched checkpoint


class StreamPatch(nn.Module):
    """``x ↦ x·P`` in fp32, cast back to the stream's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight).to(x.dtype)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    patch = getattr(module, PATCH_ATTR)
    if args:
        return (patch(args[0]), *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: patch(kwargs[key])}


def attach_patch(module: nn.Module, weight: torch.Tensor) -> StreamPatch:
    """Give ``module`` (a decoder block, or the final norm) a patch on its input; returns it."""
    if hasattr(module, PATCH_ATTR):
        raise ValueError(f"{type(module).__name__} already carries a LinearPatch")
    p = StreamPatch(weight.to(next((q.device for q in module.parameters()), weight.device)))
    module.add_module(PATCH_ATTR, p)
    module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return p


def patches_of(adapter) -> list[StreamPatch]:
    """Every patch of the model behind ``adapter`` (blocks in order, then the final norm)."""
    mods = [*adapter.layers, adapter.final_norm]
    return [getattr(m, PATCH_ATTR) for m in mods if hasattr(m, PATCH_ATTR)]


def patch_layout(adapter) -> dict | None:
    """Where the patches sit (``{"format": 1, "blocks": [...], "final_norm": bool}``), or None."""
    blocks = [i for i, b in enumerate(adapter.layers) if hasattr(b, PATCH_ATTR)]
    final = hasattr(adapter.final_norm, PATCH_ATTR)
    if not blocks and not final:
        return None
    return {"format": 1, "blocks": blocks, "final_norm": final}


def apply_patch_layout(adapter, layout: dict) -> None:
    """Attach identity patches where ``layout`` says (the weights are loaded afterwards)."""
    if int(layout.get("format", 1)) > 1:
        from .errors import ModelLoadError

        raise ModelLoadError(f"{PATCH_KEY} format {layout['format']} is newer than this fusegpt reads; upgrade fusegpt")
    d = adapter.config.hidden_size
    for i in layout.get("blocks", []):
        attach_patch(adapter.layers[i], torch.eye(d))
    if layout.get("final_norm"):
        attach_patch(adapter.final_norm, torch.eye(d))
