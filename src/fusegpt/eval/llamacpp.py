"""Measurements in the real llama.cpp (through llama-cpp-python): perplexity and llama-bench's speed.

* :func:`perplexity` — the GPTQ protocol on a GGUF file: the same non-overlapping windows as
  :func:`fusegpt.eval.perplexity.perplexity`, every position's logits from llama.cpp, a fresh KV
  cache per window.
* :func:`speed_round` — one round of ``llama-bench``'s two tests: ``pp`` = tokens/s of one
  ``n_prompt``-token prompt processed as one batch from an empty cache (pp512), ``tg`` = tokens/s
  generating ``n_gen`` tokens one at a time from an empty cache (tg128). :func:`alternating` runs
  rounds over several files in turn (A B C A B C ...), so that load on a shared machine hits every
  model alike; the median and spread of the rounds are reported.

Needs llama-cpp-python (``scripts/setup_llamacpp.sh``, or ``pip install 'fusegpt[llamacpp]'``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FusegptError


class LlamaCppMissing(FusegptError, ImportError):
    """llama-cpp-python is not installed; the message says how to get it."""


def llama_cpp_module():
    """The ``llama_cpp`` module, or :class:`LlamaCppMissing` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing("this needs llama.cpp's Python binding, llama-cpp-python: bash scripts/setup_llamacpp.sh "
                              "(builds it once), or pip install 'fusegpt[llamacpp]'") from None
    return llama_cpp


def _fresh(llm) -> None:
    llm.reset()
    llm._ctx.kv_cache_clear()


def perplexity(path: str | Path, tokens: torch.Tensor, seqlen: int, threads: int = 1,
               max_tokens: int | None = None) -> float:
    """GPTQ-protocol perplexity of the GGUF file ``path`` on ``tokens`` (1-D), windows of ``seqlen``."""
    llama_cpp = llama_cpp_module()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // seqlen
    llm = llama_cpp.Llama(str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    nll = 0.0
    try:
        for w in tokens[: n * seqlen].view(n, seqlen).tolist():
            _fresh(llm)
            llm.eval(w)
            logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            ce = logz - logits[np.arange(seqlen - 1), w[1:]]
            nll += float(ce.mean()) * seqlen
    finally:
        llm.close()
    return math.exp(nll / (n * seqlen))


def logits(path: str | Path, ids: list[int], threads: int = 1) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (one batch, a fresh context)."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(ids)), n_batch=len(ids), n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def speed_round(path: str | Path, threads: int = 1, n_prompt: int = 512, n_gen: int = 128,
                vocab: int = 1000, seed: int = 0) -> dict[str, float]:
    """One round of pp``n_prompt`` and tg``n_gen`` (tokens/s) on seeded random token ids."""
    llama_cpp = llama_cpp_module()
    prompt = np.random.default_rng(seed).integers(10, max(11, vocab), max(n_prompt, n_gen)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=max(n_prompt, n_gen) + 16, n_batch=n_prompt, n_ubatch=n_prompt,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        _fresh(llm)
        llm.eval(prompt[:8])  # warm-up: first-call allocations are not timed
        _fresh(llm)
        t = time.perf_counter()
        llm.eval(prompt[:n_prompt])
        pp = n_prompt / (time.perf_counter() - t)
        _fresh(llm)
        t = time.perf_counter()
        for tok in prompt[:n_gen]:
            llm.eval([tok])
        tg = n_gen / (time.perf_counter() - t)
    finally:
        llm.close()
    return {"pp": pp, "tg": tg}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def alternating(files: Mapping[str, tuple[str | Path, int]], rounds: int = 3, threads: int = 1, n_prompt: int = 512,
                n_gen: int = 128, progress=None) -> dict[str, dict[str, Any]]:
    """``{name: {"pp": spread, "tg": spread}}`` over ``rounds`` rounds that visit every file in turn.

    ``files``: name -> (GGUF path, vocabulary size for the random prompt)."""
    got: dict[str, dict[str, list[float]]] = {n: {"pp": [], "tg": []} for n in files}
    for _ in range(rounds):
        for name, (path, vocab) in files.items():
            r = speed_round(path, threads, n_prompt, n_gen, vocab)
            got[name]["pp"].append(r["pp"])
            got[name]["tg"].append(r["tg"])
            if progress is not None:
                progress(name)
    return {n: {k: spread(v) for k, v in d.items()} for n, d in got.items()}
