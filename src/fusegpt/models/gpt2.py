"""Adapter for GPT-2 (and DistilGPT-2): LayerNorm, biases, learned positions, ``Conv1D`` layers.

Layout: ``model.transformer.h[i]`` with ``attn.c_attn`` (fused q/k/v), ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``; embeddings ``wte`` + learned positions ``wpe``; final ``ln_f``.
Roles: ``qkv_proj → attn.c_attn`` (rows ``[0, D)`` q, ``[D, 2D)`` k, ``[2D, 3D)`` v, D = hidden
size, as ``GPT2Attention`` splits them), ``o_proj → attn.c_proj``, ``up_proj → mlp.c_fc``,
``down_proj → mlp.c_proj``; no gate.

**Conv1D.** GPT-2's ``Conv1D`` stores its weight transposed (``[in, out]``; ``y = x @ W + b``),
while fusion and OBS code reads ``nn.Linear`` semantics (``[out, in]``). The adapter therefore
converts, once and in place when it is created, every ``Conv1D`` of the blocks into a
:class:`Conv1DLinear`: an ``nn.Linear`` (weight ``[out, in]``, same function up to float
rounding of the matmul) whose *state dict* is written and read in the ``Conv1D`` layout, so
``save_pretrained`` still produces a stock GPT-2 checkpoint. :meth:`GPT2Adapter.set_linear` wraps a
plain ``nn.Linear`` handed to it (e.g. the merged result of a fusion) the same way; other
modules (a training-time fused wrapper) are stored as given.

Limits: head pruning is not supported (``GPT2Attention`` splits ``c_attn`` at the hidden size);
block removal is refused for ``scale_attn_by_inverse_layer_idx=True`` configs, whose attention
scale depends on the layer index and would change on reload.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import DecoderAdapter
from .registry import register_adapter


class Conv1DLinear(nn.Linear):
    """``nn.Linear`` that saves and loads its weight in GPT-2's ``Conv1D`` layout (``[in, out]``)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> Conv1DLinear:
        """Build from a transformers ``Conv1D`` (weight ``[in, out]``) or an ``nn.Linear``."""
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, module.bias
        else:  # Conv1D
            weight, bias = module.weight.t(), module.bias
        new = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        new.weight.requires_grad_(weight.requires_grad)
        return new

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination[prefix + "weight"]
        destination[prefix + "weight"] = w.t() if keep_vars else w.t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].shape == (self.in_features, self.out_features):
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_adapter
class GPT2Adapter(DecoderAdapter):
    """GPT-2: pre-LN blocks with biases, learned absolute positions, tied head."""

    model_types = ("gpt2",)
    _ATTR = {"qkv_proj": ("attn", "c_attn"), "o_proj": ("attn", "c_proj"), "up_proj": ("mlp", "c_fc"),
             "down_proj": ("mlp", "c_proj")}

    def __init__(self, model: nn.Module, origin: Sequence[int] | None = None):
        super().__init__(model, origin)
        for block in self.layers:
            for parent, name in self._ATTR.values():
                owner = getattr(block, parent)
                mod = getattr(owner, name)
                if not isinstance(mod, nn.Linear) and hasattr(mod, "nf"):  # transformers Conv1D
                    setattr(owner, name, Conv1DLinear.from_module(mod))

    @property
    def decoder(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.h

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.wte

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.ln_f

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    # ------------------------------------------------------------------ roles
    def linear_roles(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {role: getattr(getattr(block, p), name) for role, (p, name) in self._ATTR.items()}

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        if role not in self._ATTR:
            raise KeyError(f"GPT-2 blocks have no role {role!r}; roles: {', '.join(self._ATTR)}")
        if type(module) is nn.Linear:
            module = Conv1DLinear.from_module(module)
        parent, name = self._ATTR[role]
        setattr(getattr(block, parent), name, module)

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.ln_1, block.ln_2]

    # ------------------------------------------------------------------ geometry
    def num_heads(self, block: nn.Module) -> int:
        return block.attn.num_heads

    def num_kv_heads(self, block: nn.Module) -> int:
        return block.attn.num_heads

    def intermediate_size(self, block: nn.Module) -> int:
        return self.linear_roles(block)["up_proj"].out_features

    def set_attention_geometry(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        raise NotImplementedError("head pruning is not supported for GPT-2: its attention splits c_attn at hidden_size")

    # ------------------------------------------------------------------ running
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.decoder.drop(self.decoder.wte(input_ids) + self.decoder.wpe(positions))

    # ------------------------------------------------------------------ editing
    def check_removable(self) -> None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            raise ConfigError("cannot remove blocks of a GPT-2 with scale_attn_by_inverse_layer_idx=True: "
                             "its attention scale depends on the layer index")

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder.h = layers

    def _reindex(self, block: nn.Module, index: int) -> None:
        block.attn.layer_idx = index
