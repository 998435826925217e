"""A per-runtime cost model: how long a pruned shape takes, so a run can aim at a speed-up.

A model's *shape* is what speed depends on: per block its query heads, K/V heads and FFN width (and
the hidden size, head size, vocabulary). The cost of one llama-bench test (pp: one prompt of
``n_prompt`` tokens; tg: ``n_gen`` tokens one at a time) is modelled as

    t = c_0 + c_L · L + c_attn · Σ_l (h_l + kv_l)·d·D + c_ffn · Σ_l 3·f_l·D + c_odd · Σ_l 3·f_l·D·[f_l mod b ≠ 0]

(D hidden size, d head size, L blocks, ``b`` the runtime's alignment unit: 256 for llama.cpp's
k-quants, 32 otherwise). The last term is what an irregular width costs beyond its FLOPs (a tensor
whose rows are not a multiple of the quantisation block stays in a float type; kernels run partial
tiles), the effect that made per-layer SlimGPT models slower than dense in llama.cpp (RESULTS §8).

``fusegpt bench --calibrate`` fits the five coefficients (non-negative least squares) per runtime,
GGUF type and machine from timings of random-weight models of the architecture at a handful of
shapes (dense, shallower, narrower, irregular widths), and keeps the result in the cache
(``$FUSEGPT_CACHE/costmodel/``); ``--target-speedup`` and ``--dry-run`` read it from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

FEATURES = ("const", "blocks", "attn", "ffn", "ffn_unaligned")
TESTS = ("pp", "tg")
K_QUANT = ("q4_k_m", "q5_k_m", "q6_k")


def cost_dtype(runtime: str, dtype: str, device_type: str = "cpu") -> str:
    """The type a cost model is kept under: the GGUF type for llama.cpp; fp32 (CPU) or bf16 (GPU) for torch."""
    if runtime == "llamacpp":
        return dtype
    return "fp32" if device_type == "cpu" else "bf16"


def align_unit(runtime: str, dtype: str) -> int:
    """The width granularity the runtime's kernels want: 256 for llama.cpp's k-quants, else 32."""
    return 256 if runtime == "llamacpp" and dtype in K_QUANT else 32


@dataclass(frozen=True)
class Shape:
    """What speed depends on: per-block widths and the model's fixed sizes."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ffn: tuple[int, ...]
    hidden: int
    head_dim: int
    vocab: int

    @property
    def blocks(self) -> int:
        return len(self.ffn)

    @classmethod
    def of(cls, adapter) -> Shape:
        """The shape of the model behind ``adapter`` (a meta-device model works: nothing is read)."""
        blocks = list(adapter.layers)
        return cls(tuple(adapter.num_heads(b) for b in blocks), tuple(adapter.num_kv_heads(b) for b in blocks),
                   tuple(adapter.intermediate_size(b) for b in blocks), int(adapter.config.hidden_size),
                   int(adapter.head_dim), int(adapter.config.vocab_size))

    def with_blocks(self, keep: int) -> Shape:
        return Shape(self.heads[:keep], self.kv_heads[:keep], self.ffn[:keep], self.hidden, self.head_dim, self.vocab)

    def features(self, unit: int) -> np.ndarray:
        D, d = self.hidden, self.head_dim
        attn = sum((h + kv) * d * D for h, kv in zip(self.heads, self.kv_heads, strict=True))
        ffn = sum(3 * f * D for f in self.ffn)
        odd = sum(3 * f * D for f in self.ffn if f % unit)
        return np.array([1.0, float(self.blocks), attn / 1e6, ffn / 1e6, odd / 1e6])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def machine_key() -> str:
    """This machine as the cost model sees it: CPU model and flags (or the GPU), core count."""
    parts = [platform.machine(), str(os.cpu_count())]
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        for key in ("model name", "flags"):
            line = next((ln for ln in text.splitlines() if ln.startswith(key)), "")
            parts.append(line.split(":", 1)[-1].strip())
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


@dataclass
class CostModel:
    """Fitted seconds per test (``pp``, ``tg``) as a linear function of :meth:`Shape.features`."""

    runtime: str
    dtype: str
    architecture: str  # model type and fixed sizes, e.g. "llama-576x30-v49152"
    machine: str
    threads: int
    n_prompt: int
    n_gen: int
    coef: dict[str, list[float]] = field(default_factory=dict)  # test -> coefficients in FEATURES order
    samples: list[dict[str, Any]] = field(default_factory=list)  # the calibration shapes and timings
    device: str = "cpu"

    @property
    def unit(self) -> int:
        return align_unit(self.runtime, self.dtype)

    def seconds(self, shape: Shape, test: str) -> float:
        return float(np.dot(self.coef[test], shape.features(self.unit)))

    def speedup(self, dense: Shape, pruned: Shape) -> dict[str, float]:
        """Predicted ``{pp, tg}`` speed-up of ``pruned`` over ``dense``."""
        return {t: self.seconds(dense, t) / max(self.seconds(pruned, t), 1e-12) for t in TESTS}

    def fit(self) -> None:
        """Non-negative least squares of the samples' times on their shapes' features (relative errors)."""
        X = np.stack([Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in s["shape"].items()})
                      .features(self.unit) for s in self.samples])
        for t in TESTS:
            y = np.array([s[t] for s in self.samples])
            w = 1.0 / y  # relative errors: the small shapes count as much as the dense one
            self.coef[t] = [float(c) for c in _nnls(X * w[:, None], y * w)]

    def fit_error(self) -> dict[str, float]:
        """Largest relative error of the fit on its own samples, per test."""
        out = {}
        for t in TESTS:
            errs = [abs(self.seconds(Shape(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in s["shape"].items()}), t) / s[t] - 1) for s in self.samples]
            out[t] = max(errs) if errs else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, **asdict(self)}

    def describe(self) -> str:
        err = self.fit_error()
        lines = [f"cost model: {self.runtime} {self.dtype}, {self.architecture}, {self.threads} thread(s), machine "
                 f"{self.machine}; pp{self.n_prompt} / tg{self.n_gen}; fit error on {len(self.samples)} shapes: "
                 f"pp {100 * err['pp']:.1f}%, tg {100 * err['tg']:.1f}%"]
        for t in TESTS:
            lines.append(f"  {t}: " + ", ".join(f"{n} {c:.3g}" for n, c in zip(FEATURES, self.coef[t], strict=True)))
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        d = {k: v for k, v in d.items() if k != "format"}
        return cls(**d)


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        from scipy.optimize import nnls
    except ImportError:  # plain least squares, clipped (scipy comes with the embedded extra)
        return np.clip(np.linalg.lstsq(A, b, rcond=None)[0], 0.0, None)
    return nnls(A, b)[0]


def architecture_key(config) -> str:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return f"{c.model_type}-{c.hidden_size}x{c.num_hidden_layers}-h{c.num_attention_heads}-v{c.vocab_size}"


def cache_path(runtime: str, dtype: str, arch: str, threads: int, device: str = "cpu") -> Path:
    from .loading import cache_dir

    name = f"{runtime}-{dtype}-{arch}-t{threads}-{device}-{machine_key()}.json"
    return cache_dir() / "costmodel" / name


def load_cost_model(config, runtime: str, dtype: str, threads: int = 1, device: str = "cpu") -> CostModel:
    """The cached cost model of this architecture, runtime, type and machine, or a ConfigError saying how to
    make it."""
    dtype = cost_dtype(runtime, dtype, device)
    path = cache_path(runtime, dtype, architecture_key(config), threads, device)
    if not path.is_file():
        raise ConfigError(f"no {runtime} ({dtype}, {threads} thread(s)) cost model for this architecture on this "
                          f"machine yet; fit it once: fusegpt bench --calibrate --runtime {runtime} --dtypes {dtype} "
                          f"--threads {threads} --model MODEL (a few minutes; kept in {path.parent})")
    try:
        return CostModel.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ConfigError(f"the cost model {path} cannot be read ({e}); fit it again with fusegpt bench "
                          "--calibrate") from None


def save_cost_model(model: CostModel) -> Path:
    path = cache_path(model.runtime, model.dtype, model.architecture, model.threads, model.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(model.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path
