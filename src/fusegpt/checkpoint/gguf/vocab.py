"""The tokenizer part of a GGUF file, and the pre-tokenizer name llama.cpp will accept.

Byte-level BPE tokenizers (SmolLM2, LLaMA-3, Qwen2, GPT-2 style) are written as
``tokenizer.ggml.model = "gpt2"`` with a ``tokenizer.ggml.pre`` that names the pre-tokenizer;
llama.cpp refuses a name it does not know ("unknown pre-tokenizer type"), so
:func:`resolve_pre` picks one it knows, in this order:

1. the name asked for (``pre=`` / ``--pre NAME``), checked against llama.cpp's list;
2. the name carried over from the GGUF file the model was loaded from (``config.`` :data:`PRE_KEY`,
   written when fusegpt converts a ``.gguf`` model, kept in every checkpoint saved from it);
3. llama.cpp's converter rule: SHA-256 of the token ids of its probe text, looked up in its table
   (:mod:`.pretokenizers`);
4. a pre-tokenizer that *is* one of llama.cpp's regex sets: plain ``ByteLevel`` with its regex
   (GPT-2's) → ``gpt-2``; a ``Split`` on LLaMA-3's regex before a regex-free ``ByteLevel``, with
   ``ignore_merges`` → ``llama-bpe``; on Qwen2's regex, without → ``qwen2``;
5. else :class:`~fusegpt.checkpoint.gguf.ExportError` naming the probe hash and the choices.

SentencePiece-style BPE tokenizers (LLaMA-2, Mistral: byte fallback, ``▁`` for spaces) are
written as ``tokenizer.ggml.model = "llama"`` (llama.cpp reads no pre-tokenizer name for them)
with byte tokens typed ``BYTE`` and piece scores ``−(rank of the merge that makes the piece)``
(llama.cpp's SentencePiece tokenizer merges by score, so earlier merges must score higher;
llama.cpp's own HF fallback writes −1000 for every piece, which loses that order).
"""

from __future__ import annotations

import hashlib
import json
import logging

from .errors import ExportError, gguf_module
from .pretokenizers import HASH_TO_PRE, KNOWN_PRE, PROBE_TEXT

logger = logging.getLogger(__name__)

PRE_KEY = "gguf_tokenizer_pre"  # config attribute: the pre-tokenizer name of the GGUF the model came from

# llama.cpp's regex sets as transformers' tokenizer.json writes them (llama-vocab.cpp keeps the originals
# in comments beside its adapted copies)
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def probe_hash(tokenizer) -> str:
    """llama.cpp's converter fingerprint of a tokenizer: sha256 of ``str(encode(probe text))``."""
    return hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()


def _by_structure(spec: dict) -> str | None:
    """The llama.cpp name of a pre-tokenizer that is exactly one of its regex sets, else None."""
    pre = spec.get("pre_tokenizer") or {}
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges"))
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not ignore_merges:
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX and ignore_merges:
            return "llama-bpe"
        if regex == QWEN2_REGEX and not ignore_merges:
            return "qwen2"
    return None


def _check_known(name: str, where: str) -> str:
    if name not in KNOWN_PRE:
        raise ExportError(f"{where} {name!r} is not a pre-tokenizer llama.cpp knows; choose one of: "
                          f"{', '.join(sorted(KNOWN_PRE))}")
    return name


def resolve_pre(tokenizer, config=None, pre: str | None = None, spec: dict | None = None) -> tuple[str, str]:
    """``(name, how it was found)`` for ``tokenizer.ggml.pre`` of a byte-level BPE tokenizer
    (``spec``: its tokenizers JSON, when the caller has already parsed it)."""
    if pre is not None:
        return _check_known(pre, "--pre"), "asked for"
    carried = getattr(config, PRE_KEY, None) if config is not None else None
    if isinstance(carried, str) and carried in KNOWN_PRE:
        return carried, "carried over from the source GGUF"
    digest = probe_hash(tokenizer)
    if digest in HASH_TO_PRE:
        return HASH_TO_PRE[digest][0], f"probe hash (as {HASH_TO_PRE[digest][1]})"
    name = _by_structure(spec if spec is not None else tokenizer_spec(tokenizer))
    if name is not None:
        return name, "pre-tokenizer regex"
    raise ExportError(
        f"cannot tell which llama.cpp pre-tokenizer this tokenizer uses (probe hash {digest[:16]}…, not in "
        "llama.cpp's table, and its pre-tokenizer is not one of the regex sets fusegpt recognises); a file with a "
        "wrong name would tokenize differently, so pass --pre NAME (pre= in Python) with the name llama.cpp's "
        f"convert_hf_to_gguf.py uses for this model family; llama.cpp knows: {', '.join(sorted(KNOWN_PRE))}")


def is_sentencepiece_bpe(spec: dict) -> bool:
    """A LLaMA-2 / Mistral style tokenizer: BPE with byte fallback and '▁' for spaces."""
    model = spec.get("model") or {}
    around = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in around


def tokenizer_spec(tokenizer) -> dict:
    """The tokenizers JSON of ``tokenizer``, after checking that GGUF can hold it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not (is_sentencepiece_bpe(spec)
                                          or (spec.get("decoder") or {}).get("type") == "ByteLevel"):
        raise ExportError(f"only byte-level BPE and SentencePiece-style BPE (byte fallback, '▁') tokenizers are "
                          f"exported (this one: {model.get('type')} with {(spec.get('decoder') or {}).get('type')} "
                          "decoding)")
    return spec


def add_tokenizer(writer, tokenizer, spec: dict, vocab_size: int, pre: str | None) -> None:
    """Write ``tokenizer`` (``spec``: its :func:`tokenizer_spec`) into ``writer``; ``pre`` is the
    resolved name (None for SentencePiece style)."""
    gguf = gguf_module()
    model = spec["model"]
    spm = is_sentencepiece_bpe(spec)
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
        rank = {m.replace(" ", ""): k for k, m in enumerate(merges)}
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(rank[t] + 1) if t in rank and ty == gguf.TokenType.NORMAL else 0.0
                                 for t, ty in zip(tokens, types, strict=True)])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
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


def pre_for(tokenizer, spec: dict, config, pre: str | None) -> str | None:
    """The name to write (None for SentencePiece-style tokenizers), resolved before any file is opened."""
    if is_sentencepiece_bpe(spec):
        if pre is not None:
            logger.warning("--pre %s ignored: SentencePiece-style tokenizers carry no pre-tokenizer name", pre)
        return None
    name, how = resolve_pre(tokenizer, config, pre, spec)
    logger.info("tokenizer.ggml.pre = %s (%s)", name, how)
    return name
