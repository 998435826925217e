"""GGUF export of block-pruned and fused LLaMA-family and Qwen2 models, for llama.cpp-based runtimes.

:func:`export_gguf` writes a model (a ``LlamaForCausalLM`` or ``MistralForCausalLM``: SmolLM2,
LLaMA-1/2/3, Mistral, after ShortGPT/SLEB/MI/FuseGPT; fused layers must already be merged, as
every fusegpt checkpoint is) with the ``gguf`` package, architecture ``llama``; a
``Qwen2ForCausalLM`` goes to architecture ``qwen2`` the same way, with its q/k/v biases
(``blk.N.attn_q.bias`` …) and without the Q/K permutation (llama.cpp runs Qwen2's rotary in the
HF layout):

* metadata: ``llama.block_count`` (the pruned depth), ``context_length``, ``embedding_length``,
  ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``,
  ``attention.key_length`` / ``value_length`` (head_dim), ``rope.dimension_count``,
  ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``vocab_size``, ``general.file_type``;
* tensors in llama.cpp's names (``token_embd``, ``blk.N.attn_q`` … ``ffn_down``, ``output_norm``,
  ``output``; no ``output`` when the head is tied to the embedding). 2-D weights in f32 or f16,
  norms always f32. **Q and K rows are permuted** into llama.cpp's rotary layout
  (``convert_hf_to_gguf.py``: per head, the two rotary halves interleaved); transformers'
  GGUF loader undoes exactly this (``LlamaTensorProcessor._reverse_permute_weights``);
* the tokenizer, for byte-level BPE tokenizers (``tokenizer.ggml.model = "gpt2"``: SmolLM2,
  LLaMA-3, GPT-2-style): tokens in id order, merges, token types (control / user-defined /
  unused padding up to ``vocab_size``), bos/eos/unk/pad ids, ``add_bos_token``, the chat
  template, and ``tokenizer.ggml.pre`` recognised from the pre-tokenizer's split regex (the names
  transformers' GGUF loader maps back), else ``default`` with a warning.

Refused with a clear error: other families (their GGUF architectures differ), width-pruned models
(GGUF ``llama`` holds one head count and FFN width for all layers), rope scaling other than the
default, biases other than Qwen2's q/k/v, Qwen2 with ``use_sliding_window``, tokenizers that are
neither byte-level BPE nor SentencePiece-style BPE.

SentencePiece-style BPE tokenizers (LLaMA-2, Mistral: byte fallback, ``▁`` for spaces) are written
as ``tokenizer.ggml.model = "llama"`` with their merges, byte tokens typed ``BYTE``, and piece
scores ``−(rank of the merge that makes the piece)`` (llama.cpp's SentencePiece tokenizer merges
by score, so earlier merges must score higher; llama.cpp's own HF fallback writes −1000 for
every piece, which loses that order).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import get_adapter

logger = logging.getLogger(__name__)

# model type -> (GGUF architecture, Q/K rows permuted to llama.cpp's rotary layout, q/k/v biases written)
GGUF_ARCHS = {"llama": ("llama", True, False), "mistral": ("llama", True, False), "qwen2": ("qwen2", False, True)}
GGUF_FAMILIES = tuple(GGUF_ARCHS)
DTYPES = ("f32", "f16")


class ExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF; the message says why."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf (or fusegpt[embedded])") from None
    return gguf


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF → llama.cpp row order of a Q or K weight (``n_head`` = heads of that projection).

    Within each head, HF's rotary pairs (i, i + d/2) become adjacent rows (2i, 2i + 1), as
    llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` does.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ExportError(f"rope type {rope_type!r} (rope scaling) is not exported to GGUF; only default rotary")
    if theta is None:
        raise ExportError("the config has no rope_theta")
    return float(theta)


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` unless ``model`` can be written as GGUF architecture ``llama``."""
    config = model.config
    if config.model_type not in GGUF_FAMILIES:
        raise ExportError(f"GGUF export supports model types {', '.join(GGUF_FAMILIES)} (GGUF architectures "
                          f"'llama', 'qwen2'); this model is {config.model_type!r}")
    arch, _, qkv_bias = GGUF_ARCHS[config.model_type]
    if getattr(config, "fusegpt_widths", None):
        raise ExportError("width-pruned models cannot be exported to GGUF 'llama' (one width for all layers)")
    a = get_adapter(model)
    for i, block in enumerate(a.layers):
        roles = a.linear_roles(block)
        if any(type(m) is not nn.Linear for m in roles.values()):
            raise ExportError(f"block {i} has unmerged fused layers; merge them first (fusegpt checkpoints are merged)")
        allowed = ("q_proj", "k_proj", "v_proj") if qkv_bias else ()
        if any(m.bias is not None for role, m in roles.items() if role not in allowed):
            raise ExportError(f"biases on {', '.join(r for r, m in roles.items() if m.bias is not None)} are not "
                              f"exported to GGUF '{arch}'")
        geometry = (a.num_heads(block), a.num_kv_heads(block), a.intermediate_size(block))
        expected = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        if geometry != expected:
            raise ExportError(f"block {i} has heads/kv heads/FFN width {geometry}, the config {expected}: "
                              "width-pruned models cannot be exported to GGUF 'llama'")
    _rope_theta(config)
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError("Qwen2 with use_sliding_window=True is not exported: GGUF 'qwen2' has no sliding window")
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        logger.warning("GGUF 'llama' has no sliding window: beyond %d tokens llama.cpp attends to the full context",
                       window)


# ---------------------------------------------------------------------------------------- tokenizer
def _pre_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizers pre-tokenizer (as transformers maps it back)."""
    if pre is None:
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if pre.get("type") == "Sequence" and len(splits) == 1:
        regex = splits[0].get("pattern", {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # older transformers
            GGUF_PRE_TOKENIZER_SPLITS = {}
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex:
                return name
    logger.warning("pre-tokenizer not recognised; writing tokenizer.ggml.pre = 'default'")
    return "default"


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """A LLaMA-2 / Mistral style tokenizer: BPE with byte fallback and '▁' for spaces."""
    model = spec.get("model") or {}
    around = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in around


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    spm = _is_sentencepiece_bpe(spec)
    if model.get("type") != "BPE" or not (spm or (spec.get("decoder") or {}).get("type") == "ByteLevel"):
        raise ExportError(f"only byte-level BPE and SentencePiece-style BPE (byte fallback, '▁') tokenizers are "
                          f"exported (this one: {model.get('type')} with {(spec.get('decoder') or {}).get('type')} "
                          "decoding)")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    id_to_token.update({i: t["content"] for i, t in added.items()})
    n = max(id_to_token) + 1
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(id_to_token[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif spm and id_to_token[i] == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif spm and len(id_to_token[i]) == 6 and id_to_token[i].startswith("<0x") and id_to_token[i].endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if spm:
        # llama.cpp's SentencePiece tokenizer merges by piece score: earlier merges score higher
        rank = {m.replace(" ", ""): k for k, m in enumerate(merges)}
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(rank[t] + 1) if t in rank and ty == gguf.TokenType.NORMAL else 0.0
                                 for t, ty in zip(tokens, types, strict=True)])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
        writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            add(tid)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# ---------------------------------------------------------------------------------------- weights
def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(gguf name, tensor)`` in llama.cpp's order and layout."""
    a = get_adapter(model)
    cfg = model.config
    _, permute, _ = GGUF_ARCHS[cfg.model_type]

    def qk(w: torch.Tensor, n: int) -> torch.Tensor:
        return permute_rotary(w, n) if permute else w

    out = [("token_embd.weight", a.embed_tokens.weight)]
    for i, block in enumerate(a.layers):
        r = a.linear_roles(block)
        out += [
            (f"blk.{i}.attn_norm.weight", block.input_layernorm.weight),
            (f"blk.{i}.attn_q.weight", qk(r["q_proj"].weight, a.num_heads(block))),
            (f"blk.{i}.attn_k.weight", qk(r["k_proj"].weight, a.num_kv_heads(block))),
            (f"blk.{i}.attn_v.weight", r["v_proj"].weight),
        ]
        for role, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            if r[role].bias is not None:  # qwen2 (biases are refused for 'llama' by check_exportable)
                out.append((f"blk.{i}.attn_{short}.bias", r[role].bias))
        out += [
            (f"blk.{i}.attn_output.weight", r["o_proj"].weight),
            (f"blk.{i}.ffn_norm.weight", block.post_attention_layernorm.weight),
            (f"blk.{i}.ffn_gate.weight", r["gate_proj"].weight),
            (f"blk.{i}.ffn_up.weight", r["up_proj"].weight),
            (f"blk.{i}.ffn_down.weight", r["down_proj"].weight),
        ]
    out.append(("output_norm.weight", a.final_norm.weight))
    tied = getattr(cfg, "tie_word_embeddings", False) and a.lm_head.weight.data_ptr() == a.embed_tokens.weight.data_ptr()
    if not tied:
        out.append(("output.weight", a.lm_head.weight))
    return out


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f32", name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``, may be ``None``) to the GGUF file ``path``; returns it.

    ``dtype``: ``f32`` or ``f16`` for the 2-D weights (norms stay f32). The file is written to a
    temporary name beside ``path`` and renamed, so a failure leaves nothing half-written; an
    existing ``path`` is refused unless ``overwrite``.
    """
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    check_exportable(model)
    cfg = model.config
    a = get_adapter(model)
    head_dim = a.head_dim
    writer_dtype = np.float16 if dtype == "f16" else np.float32
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCHS[cfg.model_type][0])
    try:
        writer.add_name(name or getattr(cfg, "_name_or_path", None) or "fusegpt-pruned")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(a.num_layers)
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(int(cfg.num_attention_heads))
        writer.add_head_count_kv(int(cfg.num_key_value_heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(int(cfg.vocab_size))
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, int(cfg.vocab_size))
        else:
            logger.warning("no tokenizer: the GGUF file holds weights only (llama.cpp needs a tokenizer to serve it)")
        for tname, t in _tensors(model):
            arr = t.detach().float().cpu().numpy()
            writer.add_tensor(tname, arr.astype(writer_dtype if arr.ndim == 2 else np.float32))  # 1-D stay f32
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d blocks, %s)", out, a.num_layers, dtype)
    return out
