"""GGUF export of pruned LLaMA-family and Qwen2 models, for llama.cpp and its front ends.

:func:`export_gguf` writes a model with the ``gguf`` package. Which GGUF architecture:

* ``llama``: a ``LlamaForCausalLM`` or ``MistralForCausalLM`` (SmolLM2, LLaMA-1/2/3, Mistral)
  after depth pruning (ShortGPT, SLEB, MI, FuseGPT: fused layers are merged in every fusegpt
  checkpoint), one head count and FFN width for all layers;
* ``deci`` (llama.cpp's architecture for NVIDIA's Nemotron-NAS models, which builds each layer at
  its own width): the same families after width pruning (SlimGPT): ``deci.attention.head_count``,
  ``head_count_kv`` and ``deci.feed_forward_length`` are per-layer arrays. Stock transformers
  cannot load these files (its GGUF loader has no ``deci``); llama.cpp can;
* ``qwen2``: a ``Qwen2ForCausalLM`` after depth pruning, with its q/k/v biases
  (``blk.N.attn_q.bias`` …) and without the Q/K permutation (llama.cpp runs Qwen2's rotary in the
  HF layout).

Metadata: ``block_count`` (the pruned depth), ``context_length``, ``embedding_length``,
``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``, ``attention.key_length``
/ ``value_length`` (head_dim), ``rope.dimension_count``, ``rope.freq_base``,
``attention.layer_norm_rms_epsilon``, ``vocab_size``, ``general.file_type``; tensors in
llama.cpp's names (``token_embd``, ``blk.N.attn_q`` … ``ffn_down``, ``output_norm``, ``output``;
no ``output`` when the head is tied to the embedding). **Q and K rows are permuted** into
llama.cpp's rotary layout (``convert_hf_to_gguf.py``: per head, the two rotary halves
interleaved); transformers' GGUF loader undoes exactly this
(``LlamaTensorProcessor._reverse_permute_weights``). Tensor types: :mod:`.quant` (``f32``,
``f16``, ``bf16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``). The tokenizer, with a
pre-tokenizer name llama.cpp accepts: :mod:`.vocab`.

Refused with a clear error: other families (their GGUF architectures differ), rope scaling other
than the default, biases other than Qwen2's q/k/v, width-pruned Qwen2 (``deci`` has no q/k/v
biases), layers with no heads, Qwen2 with ``use_sliding_window``, tokenizers that are neither
byte-level BPE nor SentencePiece-style BPE, and byte-level tokenizers whose pre-tokenizer cannot be
named (pass ``pre=``).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import torch
from torch import nn

from ...models import get_adapter
from ..width import is_width_pruned_model, layer_widths
from .errors import ExportError, gguf_module
from .quant import DTYPES, K_QUANTS, check_dtype, encode, file_type, quantize_k
from .vocab import PRE_KEY, add_tokenizer, pre_for, probe_hash, resolve_pre, tokenizer_spec

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "GGUF_FAMILIES", "K_QUANTS", "RUN_ID_KEY", "check_gguf_output", "is_fusegpt_gguf", "PRE_KEY", "ExportError", "check_exportable", "export_gguf", "gguf_arch",
           "permute_rotary", "probe_hash", "resolve_pre"]

# model type -> (GGUF architecture, Q/K rows permuted to llama.cpp's rotary layout, q/k/v biases written)
GGUF_ARCHS = {"llama": ("llama", True, False), "mistral": ("llama", True, False), "qwen2": ("qwen2", False, True)}
GGUF_FAMILIES = tuple(GGUF_ARCHS)
WIDTH_ARCH = "deci"  # llama.cpp's per-layer-width LLaMA


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


def gguf_arch(model: nn.Module) -> str:
    """The GGUF architecture ``model`` is written as (``llama``, ``deci`` or ``qwen2``)."""
    arch = GGUF_ARCHS[model.config.model_type][0]
    return WIDTH_ARCH if is_width_pruned_model(model) else arch


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` unless ``model`` can be written as GGUF (see the module doc)."""
    config = model.config
    if config.model_type not in GGUF_FAMILIES:
        raise ExportError(f"GGUF export supports model types {', '.join(GGUF_FAMILIES)} (GGUF architectures "
                          f"'llama', 'deci' for width-pruned, 'qwen2'); this model is {config.model_type!r}")
    from ..sliced import is_sliced_model

    if is_sliced_model(get_adapter(model)):
        raise ExportError("SliceGPT models are not exported to GGUF: their blocks carry shortcut matrices on the "
                          "residual adds and scale-free norms over a sliced stream, which no llama.cpp architecture "
                          "has; run them through fusegpt.load_pruned (transformers)")
    from ...patching import patches_of

    if patches_of(get_adapter(model)):
        raise ExportError("LinearPatch-ed models are not exported to GGUF: the patch is a d×d matrix on the residual "
                          "stream, which no llama.cpp architecture has; run them through fusegpt.load_pruned")
    _, _, qkv_bias = GGUF_ARCHS[config.model_type]
    arch = gguf_arch(model)
    if arch == WIDTH_ARCH and qkv_bias:
        raise ExportError(f"width-pruned {config.model_type} models are not exported: GGUF 'deci' (per-layer widths) "
                          "has no q/k/v biases; export a depth-pruned one, or use fusegpt.load_pruned")
    a = get_adapter(model)
    for i, block in enumerate(a.layers):
        roles = a.linear_roles(block)
        if any(type(m) is not nn.Linear for m in roles.values()):
            raise ExportError(f"block {i} has unmerged fused layers; merge them first (fusegpt checkpoints are merged)")
        allowed = ("q_proj", "k_proj", "v_proj") if qkv_bias else ()
        if any(m.bias is not None for role, m in roles.items() if role not in allowed):
            raise ExportError(f"biases on {', '.join(r for r, m in roles.items() if m.bias is not None)} are not "
                              f"exported to GGUF '{arch}'")
        heads, kv = a.num_heads(block), a.num_kv_heads(block)
        if heads == 0 or kv == 0 or heads % kv:
            raise ExportError(f"block {i} has {heads} query and {kv} K/V heads; llama.cpp needs at least one of each "
                              "and query heads a multiple of K/V heads")
    _rope_theta(config)
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError("Qwen2 with use_sliding_window=True is not exported: GGUF 'qwen2' has no sliding window")
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        logger.warning("GGUF has no sliding window for this architecture: beyond %d tokens llama.cpp attends to "
                       "the full context", window)


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


def _add_hparams(writer, model: nn.Module, arch: str) -> None:
    cfg = model.config
    a = get_adapter(model)
    head_dim = a.head_dim
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(a.num_layers)
    if arch == WIDTH_ARCH:
        widths = layer_widths(a)
        writer.add_feed_forward_length(widths["intermediate_size"])
        writer.add_head_count(widths["num_attention_heads"])
        writer.add_head_count_kv(widths["num_key_value_heads"])
    else:
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(int(cfg.num_attention_heads))
        writer.add_head_count_kv(int(cfg.num_key_value_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))


RUN_ID_KEY = "fusegpt.run_id"  # proves a GGUF file was written by fusegpt (so --overwrite may replace it)


def is_fusegpt_gguf(path: Path) -> bool:
    """True when ``path`` is a GGUF file carrying fusegpt's :data:`RUN_ID_KEY`."""
    gguf = gguf_module()
    try:
        return RUN_ID_KEY in gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError, IndexError):  # not a GGUF file (or a truncated one)
        return False


def check_gguf_output(path: str | Path, overwrite: bool, inputs=()) -> Path:
    """Check the export target before any work: not an input (the model's folder, its files, the source
    GGUF), and, if it exists, replaced only with ``overwrite`` and only when fusegpt wrote it."""
    from ...errors import OutputExistsError
    from ..atomic import check_writable

    out = Path(path).expanduser()
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).expanduser().resolve()
        if resolved == p or p in resolved.parents:
            raise OutputExistsError(f"refusing to write {out}: it is (or is inside) the input {p}; choose another "
                                    "--gguf")
    if out.exists() or out.is_symlink():
        if not out.is_file() or out.is_symlink():
            raise OutputExistsError(f"{out} exists and is not a file; choose another --gguf")
        if not overwrite:
            raise OutputExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
        if not is_fusegpt_gguf(out):
            raise OutputExistsError(f"refusing to replace {out}: it is not a GGUF file fusegpt wrote; choose another "
                                    "--gguf or delete it yourself")
    check_writable(out.parent)
    return out


def display_name(config) -> str:
    """``general.name``: the model's name, never a local path (a folder's own name instead)."""
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return "fusegpt-pruned"
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists() or name.startswith((".", "~")):
        return p.resolve().name or "fusegpt-pruned"
    return name


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f32", name: str | None = None,
                overwrite: bool = False, pre: str | None = None, inputs=(), threads: int = 0) -> Path:
    """Write ``model`` (and ``tokenizer``, may be ``None``) to the GGUF file ``path``; returns it.

    ``dtype``: one of :data:`DTYPES` for the 2-D weights (norms stay f32; see :mod:`.quant`); a
    k-quant is an f16 file quantised by llama.cpp (``threads`` for it, 0 = its default).
    ``pre``: force ``tokenizer.ggml.pre`` (a name llama.cpp knows) instead of deriving it. Every
    check runs before the file is opened; the file is written to a temporary name beside ``path``
    and renamed, so a failure leaves nothing half-written; an existing ``path`` is replaced only
    with ``overwrite`` and only if fusegpt wrote it (:data:`RUN_ID_KEY`); ``inputs`` (the model's
    folder or files) are never written.
    """
    gguf = gguf_module()
    check_dtype(dtype)
    out = check_gguf_output(path, overwrite, inputs)
    check_exportable(model)
    cfg = model.config
    spec = tokenizer_spec(tokenizer) if tokenizer is not None else None  # parsed once, checked before writing
    pre_name = pre_for(tokenizer, spec, cfg, pre) if tokenizer is not None else None
    arch = gguf_arch(model)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    f16 = "f16" if dtype in K_QUANTS else dtype
    try:
        writer.add_name(name or display_name(cfg))
        writer.add_string(RUN_ID_KEY, uuid.uuid4().hex)
        writer.add_file_type(file_type(dtype))
        _add_hparams(writer, model, arch)
        if tokenizer is not None:
            add_tokenizer(writer, tokenizer, spec, int(cfg.vocab_size), pre_name)
        else:
            logger.warning("no tokenizer: the GGUF file holds weights only (llama.cpp needs a tokenizer to serve it)")
        for tname, t in _tensors(model):
            data, raw = encode(tname, t.detach().float().cpu().numpy(), f16)
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if dtype in K_QUANTS:
            quant = out.with_name(f".{out.name}.q.tmp")
            try:
                quantize_k(str(tmp), str(quant), dtype, threads)
                quant.replace(out)
            finally:
                quant.unlink(missing_ok=True)
                tmp.unlink(missing_ok=True)
        else:
            tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %d blocks, %s)", out, arch, get_adapter(model).num_layers, dtype)
    return out
