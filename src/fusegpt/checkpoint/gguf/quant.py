"""Tensor types of the GGUF export: float and the block quantisations the ``gguf`` package writes.

``f32`` / ``f16`` / ``bf16`` store every 2-D weight in that type; ``q8_0``, ``q5_1``, ``q5_0``,
``q4_1``, ``q4_0`` quantise every 2-D weight (embeddings and output head included, as llama.cpp's
``convert_hf_to_gguf.py --outtype q8_0`` does) in blocks of 32 along a row. A weight whose rows are
not a multiple of 32 long (a width-pruned FFN's ``down_proj`` can be) is kept in f16, as llama.cpp's
converter falls back; norms and biases are always f32.

The k-quants users download (``q4_k_m``, ``q5_k_m``, ``q6_k``: super-blocks of 256 values) are made
by llama.cpp's own quantiser (``llama_model_quantize``, through llama-cpp-python, extra
``llamacpp``) from an ``f16`` export: the ``_m`` mixes give some tensors a larger type exactly as
``llama-quantize`` does, and a tensor whose rows are not a multiple of 256 gets llama.cpp's fallback
type (q5_0 / q5_1 / q8_0 / f16 by row length; a width model aligned to 256 avoids it, see
``--set align``).
"""

from __future__ import annotations

import logging

import numpy as np

from ...eval.llamacpp import llama_cpp_module
from .errors import ExportError, gguf_module

logger = logging.getLogger(__name__)

DIRECT = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
DTYPES = (*DIRECT, *K_QUANTS)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype in K_QUANTS:
        llama_cpp_module()


def quantize_k(src: str, out: str, dtype: str, threads: int = 0) -> None:
    """``llama_model_quantize`` of the f16 GGUF ``src`` into ``out`` at the k-quant ``dtype``."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    if rc != 0:
        raise ExportError(f"llama.cpp's quantiser failed on {src} -> {dtype} (return code {rc}); see its log above")


def file_type(dtype: str):
    """``general.file_type`` for ``dtype`` (llama.cpp's 'mostly' type)."""
    ft = gguf_module().LlamaFileType
    if dtype in K_QUANTS:
        return ft.MOSTLY_F16  # written as f16 first; the quantiser sets its own
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
            "q5_1": ft.MOSTLY_Q5_1, "q5_0": ft.MOSTLY_Q5_0, "q4_1": ft.MOSTLY_Q4_1, "q4_0": ft.MOSTLY_Q4_0}[dtype]


def encode(name: str, arr: np.ndarray, dtype: str) -> tuple[np.ndarray, object | None]:
    """``(data, raw_dtype)`` to hand to ``GGUFWriter.add_tensor`` for an fp32 array ``arr``."""
    gguf = gguf_module()
    if arr.ndim != 2 or dtype == "f32":
        return arr.astype(np.float32), None
    if dtype == "f16":
        return arr.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        logger.info("%s: rows of %d are not a multiple of %d; kept in f16", name, arr.shape[-1], block)
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype
