"""Tensor types of the GGUF export: float and the block quantisations the ``gguf`` package writes.

``f32`` / ``f16`` / ``bf16`` store every 2-D weight in that type; ``q8_0``, ``q5_1``, ``q5_0``,
``q4_1``, ``q4_0`` quantise every 2-D weight (embeddings and output head included, as llama.cpp's
``convert_hf_to_gguf.py --outtype q8_0`` does) in blocks of 32 along a row. A weight whose rows are
not a multiple of 32 long (a width-pruned FFN's ``down_proj`` can be) is kept in f16, as llama.cpp's
converter falls back; norms and biases are always f32. The k-quants (``q4_k`` …) are not offered:
the ``gguf`` package cannot quantise to them; run llama.cpp's ``llama-quantize`` on an ``f16``
export for those.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import ExportError, gguf_module

logger = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        hint = " (k-quants: export f16, then run llama.cpp's llama-quantize)" if dtype.lower().endswith("_k") else ""
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}{hint}")


def file_type(dtype: str):
    """``general.file_type`` for ``dtype`` (llama.cpp's 'mostly' type)."""
    ft = gguf_module().LlamaFileType
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
