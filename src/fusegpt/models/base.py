"""The adapter interface every algorithm talks to.

Pruning, fusion, OBS and evaluation code never spell ``model.model.layers`` or
``self_attn.q_proj``; they ask a :class:`DecoderAdapter`. One adapter class serves one
family of architectures and is registered for its ``config.model_type`` values in
:mod:`fusegpt.models.registry`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..offload.store import offloader_of

# Canonical linear-layer roles inside a decoder block, in forward order.
ATTN_IN_ROLES = ("q_proj", "k_proj", "v_proj")
ATTN_OUT_ROLE = "o_proj"
MLP_IN_ROLES = ("gate_proj", "up_proj")
MLP_OUT_ROLE = "down_proj"
ROLES = (*ATTN_IN_ROLES, ATTN_OUT_ROLE, *MLP_IN_ROLES, MLP_OUT_ROLE)


@dataclass
class BlockContext:
    """What a decoder block needs besides its hidden states: rotary tables and masks.

    Built once per sequence shape by :meth:`DecoderAdapter.context` and reused for every
    block, so running one block is cheap.
    """

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)


class DecoderAdapter:
    """Uniform access to a Hugging Face decoder-only causal LM.

    Subclasses set :attr:`model_types` and override what differs in their family.
    """

    model_types: tuple[str, ...] = ()
    # how load_model builds the model: the transformers auto class and attention implementation
    auto_class: str = "AutoModelForCausalLM"
    attn_implementation: str = "sdpa"
    # a block's output is its input stream plus its down projection's output (no norm after the FFN): what
    # ReplaceMe's and linear_fold's map folded into the down projection needs
    residual_down_proj: bool = True

    def __init__(self, model: nn.Module, origin: Sequence[int] | None = None):
        self.model = model
        self.config: Any = model.config
        self._origin = list(origin) if origin is not None else None
        if self._origin is not None and len(self._origin) != self.num_layers:
            raise ValueError(f"origin lists {len(self._origin)} blocks, the model has {self.num_layers}")

    # ------------------------------------------------------------------ structure
    @property
    def decoder(self) -> nn.Module:
        """The inner decoder module (holds embeddings, layers, final norm)."""
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def max_context(self) -> int | None:
        """The longest sequence the model was configured for, if the config says."""
        return getattr(self.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ roles
    def linear_roles(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linear layers keyed by role (``q_proj`` … ``down_proj``)."""
        attn, mlp = block.self_attn, block.mlp
        return {
            "q_proj": attn.q_proj,
            "k_proj": attn.k_proj,
            "v_proj": attn.v_proj,
            "o_proj": attn.o_proj,
            "gate_proj": mlp.gate_proj,
            "up_proj": mlp.up_proj,
            "down_proj": mlp.down_proj,
        }

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        """Replace the linear layer of ``role`` in ``block`` (used by fusion and width pruning)."""
        parent = block.self_attn if role in (*ATTN_IN_ROLES, ATTN_OUT_ROLE) else block.mlp
        setattr(parent, role, module)

    def norm_modules(self, block: nn.Module) -> list[nn.Module]:
        """Normalisation modules of a block (trainable during group fine-tuning)."""
        return [block.input_layernorm, block.post_attention_layernorm]

    def stream_writers(self) -> list[nn.Linear]:
        """Linear layers outside the blocks that write into the stream entering block 0 beside the
        token embeddings (LLaVA's projector); a rotation of that stream must rotate them too."""
        return []

    # ------------------------------------------------------------------ geometry
    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return hd or self.config.hidden_size // self.config.num_attention_heads

    def num_heads(self, block: nn.Module) -> int:
        """Query heads of this block (may differ per block after width pruning)."""
        return self.linear_roles(block)["q_proj"].out_features // self.head_dim

    def num_kv_heads(self, block: nn.Module) -> int:
        return self.linear_roles(block)["k_proj"].out_features // self.head_dim

    def intermediate_size(self, block: nn.Module) -> int:
        return self.linear_roles(block)["up_proj"].out_features

    def set_attention_geometry(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Tell the attention module its (pruned) head counts, where it keeps them."""
        attn = block.self_attn
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"query heads ({n_heads}) must be a positive multiple of K/V heads ({n_kv_heads})")
        attn.num_key_value_groups = n_heads // n_kv_heads
        for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def set_uniform_widths(self, n_heads: int, n_kv_heads: int, ffn: int) -> None:
        """Every block now has these widths: write them into the config (``head_dim`` explicit, since
        ``hidden_size / num_attention_heads`` no longer gives it), so the model is a stock one of its
        architecture and ``save_pretrained`` writes a checkpoint stock ``from_pretrained`` rebuilds."""
        cfg = self.config
        cfg.head_dim = self.head_dim
        cfg.num_attention_heads = n_heads
        cfg.num_key_value_heads = n_kv_heads
        cfg.intermediate_size = ffn

    # ------------------------------------------------------------------ running
    def layer_type(self, index: int) -> str:
        """``full_attention`` or ``sliding_attention`` for the block at ``index``."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        return "full_attention"

    def context(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None) -> BlockContext:
        """Rotary tables and causal masks for full, unpadded sequences shaped like ``hidden``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = getattr(self.decoder, "rotary_emb", None)
        pos_emb = None
        if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
            # one table per attention kind (Gemma 3: local and global layers have their own RoPE base)
            pos_emb = {kind: rotary(hidden, position_ids, kind) for kind in {self.layer_type(i) for i in
                                                                             range(self.num_layers)}}
        elif rotary is not None:
            pos_emb = rotary(hidden, position_ids=position_ids)
        masks: dict[str, torch.Tensor | None] = {}
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids)
        for kind in {self.layer_type(i) for i in range(self.num_layers)}:
            fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = fn(**kwargs, **{_cache_arg(fn): None})
        return BlockContext(position_ids=position_ids, position_embeddings=pos_emb, masks=masks)

    # ------------------------------------------------------------------ layer-wise execution
    @property
    def offloader(self):
        """The :class:`~fusegpt.offload.BlockOffloader` of this model, or None when resident."""
        return offloader_of(self.model)

    def block_prefixes(self) -> list[str]:
        """State-dict prefix (``"model.layers.3."``) of each current block, in block order."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return [names[id(b)] + "." for b in self.layers]

    @contextlib.contextmanager
    def using(self, indices: Sequence[int], write: bool = False) -> Iterator[None]:
        """Keep blocks ``indices`` on the compute device inside the ``with`` (no-op when resident).

        Pass ``write=True`` when the code inside edits them, so the edit is kept in the store.
        """
        off = self.offloader
        if off is None:
            yield
            return
        with off.use([self.layers[i] for i in indices], write=write):
            yield

    def contexts(self, chunks: Sequence[torch.Tensor]) -> list[BlockContext]:
        """One context per chunk, shared between chunks of the same shape (masks are not copied)."""
        by_shape: dict[tuple[int, ...], BlockContext] = {}
        for h in chunks:
            if tuple(h.shape[:2]) not in by_shape:
                by_shape[tuple(h.shape[:2])] = self.context(h)
        return [by_shape[tuple(h.shape[:2])] for h in chunks]

    def run_layerwise(self, chunks: list[torch.Tensor], ctxs: list[BlockContext], start: int = 0,
                      end: int | None = None) -> list[torch.Tensor]:
        """Run blocks ``start … end-1`` over every chunk, block by block (each block comes in once).

        When the model is offloaded to a GPU, the chunks wait on the CPU between blocks, so only
        one chunk's hidden states and one block sit on the device at a time.
        """
        end = self.num_layers if end is None else end
        off = self.offloader
        park = off is not None and off.device.type != "cpu"
        for i in range(start, end):
            with self.using([i]):
                out = []
                for h, ctx in zip(chunks, ctxs, strict=True):
                    h = self.run_block(self.layers[i], h.to(self.device), ctx, i)
                    out.append(h.to("cpu") if park else h)
                chunks = out
        return chunks

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, index: int | None = None) -> torch.Tensor:
        """Run one decoder block. ``index`` picks the mask type; default is the block's own.

        An offloaded block is brought to the device for this call; a block on another device
        (a multi-GPU device map) gets the hidden states and context moved to it, and its output
        is moved back to the adapter's device.
        """
        off = self.offloader
        if off is not None and not off.is_resident(block):
            with off.use([block]):
                return self._run_block(block, hidden, ctx, index)
        return self._run_block(block, hidden, ctx, index)

    def _run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, index: int | None) -> torch.Tensor:
        dev = _block_device(block)
        if dev is not None and dev != hidden.device:
            back = hidden.device
            return self._call_block(block, hidden.to(dev), _ctx_to(ctx, dev), index).to(back)
        return self._call_block(block, hidden, ctx, index)

    def _call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, index: int | None) -> torch.Tensor:
        kind = getattr(block, "attention_type", None) or (self.layer_type(index) if index is not None else "full_attention")
        kwargs = {"attention_mask": ctx.masks.get(kind), "position_ids": ctx.position_ids, "use_cache": False}
        pe = ctx.position_embeddings
        if isinstance(pe, dict):  # per attention kind (Gemma 3)
            pe = pe[kind]
        if pe is not None:  # rotary models; learned positions are added in embed()
            kwargs["position_embeddings"] = pe
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        ctx: BlockContext | None = None,
        skip: Sequence[int] = (),
    ) -> torch.Tensor:
        """Run blocks ``start … end-1`` (skipping ``skip``) on ``hidden``."""
        end = self.num_layers if end is None else end
        ctx = ctx or self.context(hidden)
        for i in range(start, end):
            if i in skip:
                continue
            hidden = self.run_block(self.layers[i], hidden, ctx, i)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0."""
        return self.embed_tokens(input_ids.to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the output of the last block."""
        return self.lm_head(self.final_norm(hidden))

    # ------------------------------------------------------------------ editing
    @property
    def origin(self) -> list[int]:
        """Original index (in the model the run started from) of each current block.

        Kept on this adapter, which a run creates once (:class:`fusegpt.runstate.RunContext`);
        a model pruned earlier passes its origin in (``compress(..., origin=...)``).
        """
        return list(self._origin) if self._origin is not None else list(range(self.num_layers))

    def check_removable(self) -> None:
        """Raise ValueError when this model's blocks cannot be removed (a family hook)."""

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder.layers = layers

    def _reindex(self, block: nn.Module, index: int) -> None:
        """Give ``block`` its new position (the KV cache is keyed by the attention's ``layer_idx``)."""
        attn = getattr(block, "self_attn", None)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = index
        if hasattr(block, "layer_idx"):
            block.layer_idx = index

    def keep_layers(self, keep: Sequence[int]) -> None:
        """Keep only the blocks at ``keep`` (in that order) and fix what the runtime indexes.

        Re-indexes each block (:meth:`_reindex`), sets ``config.num_hidden_layers``, trims
        ``config.layer_types`` and ``max_window_layers`` where present, and drops the removed
        blocks from an offloader's store.
        """
        self.check_removable()
        keep = list(keep)
        if sorted(set(keep)) != keep or not keep or keep[-1] >= self.num_layers:
            raise ValueError(f"keep must be increasing block indices in [0, {self.num_layers}), got {keep}")
        origin = self.origin
        types = getattr(self.config, "layer_types", None)
        new_layers = nn.ModuleList([self.layers[i] for i in keep])
        self._set_layers(new_layers)
        self._origin = [origin[i] for i in keep]
        for new_idx, block in enumerate(new_layers):
            self._reindex(block, new_idx)
        self.config.num_hidden_layers = len(keep)
        if self.offloader is not None:
            self.offloader.forget(new_layers)
        if types:
            self.config.layer_types = [types[i] for i in keep]
        mwl = getattr(self.config, "max_window_layers", None)
        if isinstance(mwl, int) and mwl > len(keep):
            self.config.max_window_layers = len(keep)


@functools.cache
def _cache_arg(fn) -> str:
    """The mask builders' cache argument: ``cache`` in newer transformers, ``past_key_values`` before
    (passing the old name now prints a FutureWarning into every progress bar)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _block_device(block: nn.Module) -> torch.device | None:
    """Device of a block's first real parameter (None for parameterless or meta blocks)."""
    for p in block.parameters():
        return None if p.is_meta else p.device
    return None


def _ctx_to(ctx: BlockContext, dev: torch.device) -> BlockContext:
    pe = ctx.position_embeddings
    return BlockContext(
        position_ids=ctx.position_ids.to(dev),
        position_embeddings=({k: tuple(t.to(dev) for t in v) for k, v in pe.items()} if isinstance(pe, dict)
                             else tuple(t.to(dev) for t in pe) if pe is not None else None),
        masks={k: (m.to(dev) if isinstance(m, torch.Tensor) else m) for k, m in ctx.masks.items()},
    )
