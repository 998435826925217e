"""Speed in the runtimes users ship to, as a result beside perplexity.

* ``runtime="torch"``: :func:`fusegpt.eval.speed.bench_models` (prefill latency and decode tokens/s
  of the model in PyTorch, on its device).
* ``runtime="llamacpp"``: every model is exported to GGUF (:func:`fusegpt.checkpoint.gguf.export_gguf`,
  once per ``dtypes`` entry, k-quants through llama.cpp's own quantiser) and timed in llama.cpp as
  ``llama-bench`` does (pp512 and tg128, :mod:`fusegpt.eval.llamacpp`), all files in alternating
  rounds; median and spread per file, speed-ups against the first model at the same type.

The ideal speed-up is the ratio of decoder-block parameters (what depth and width pruning remove).
:func:`pareto` marks, among (speed-up, perplexity) points, those no other point beats on both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ConfigError

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "llamacpp")
SPEED_DTYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def check_runtime(runtime: str, dtypes: Sequence[str] = ()) -> None:
    """Refuse an unknown runtime or GGUF type, and a missing llama.cpp, before any work."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "llamacpp":
        from .eval.llamacpp import llama_cpp_module

        bad = [d for d in dtypes if d not in SPEED_DTYPES]
        if bad or not dtypes:
            raise ConfigError(f"GGUF type(s) {', '.join(bad) or '(none)'} for llama.cpp; choose from "
                              f"{', '.join(SPEED_DTYPES)}")
        llama_cpp_module()


def bench_llamacpp(specs: Sequence[str | None], dtypes: Sequence[str] = ("f16",), rounds: int = 3, threads: int = 1,
                   n_prompt: int = 512, n_gen: int = 128, names: Sequence[str] | None = None,
                   skip_unexportable: bool = False) -> dict[str, Any]:
    """Export every model at every type, then time all files in ``rounds`` alternating rounds.

    ``skip_unexportable``: a model GGUF cannot hold (SliceGPT's) is left out with a warning instead of
    stopping the benchmark (the first model, the baseline, must export)."""
    from .checkpoint.gguf import ExportError, check_exportable, export_gguf, gguf_arch
    from .eval import llamacpp
    from .eval.speed import param_summary
    from .loading import load_model
    from .report import library_versions

    check_runtime("llamacpp", dtypes)
    labels = list(names) if names else [s or "embedded:SmolLM2-135M-Instruct" for s in specs]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fusegpt-bench-") as tmp:
        files: dict[str, tuple[Path, int]] = {}
        for i, (spec, label) in enumerate(zip(specs, labels, strict=True)):
            model, tok = load_model(spec)
            if skip_unexportable and i > 0:
                try:
                    check_exportable(model)
                except ExportError as e:
                    logger.warning("%s is not timed in llama.cpp: %s", label, e)
                    continue
            i = len(results)
            row = {"model": label, **param_summary(model), "arch": gguf_arch(model), "cells": {}}
            for dtype in dtypes:
                path = export_gguf(model, tok, Path(tmp) / f"{i}-{dtype}.gguf", dtype=dtype, threads=threads)
                files[f"{i}|{dtype}"] = (path, int(model.config.vocab_size))
                row["cells"][dtype] = {"size_mib": round(path.stat().st_size / 2**20, 1)}
            results.append(row)
            del model
        bar = tqdm(total=rounds * len(files), desc="llama.cpp rounds", unit="file")
        got = llamacpp.alternating(files, rounds, threads, n_prompt, n_gen, progress=lambda _: bar.update(1))
        bar.close()
    for key, r in got.items():
        i, dtype = key.split("|")
        results[int(i)]["cells"][dtype].update(r)
    base = results[0]
    for r in results:
        r["ideal_speedup_blocks"] = base["block_params"] / r["block_params"]
        for dtype, c in r["cells"].items():
            b = base["cells"][dtype]
            c["pp_speedup"] = c["pp"]["median"] / b["pp"]["median"]
            c["tg_speedup"] = c["tg"]["median"] / b["tg"]["median"]
    return {"runtime": "llamacpp", "models": results,
            "settings": {"dtypes": list(dtypes), "rounds": rounds, "threads": threads, "n_prompt": n_prompt,
                         "n_gen": n_gen},
            "versions": library_versions(),
            "note": f"llama-bench's pp{n_prompt} and tg{n_gen} (tokens/s), median over alternating rounds "
                    "(min..max); speed-up against the first model at the same type; ideal = decoder-block "
                    "parameter ratio."}


def format_llamacpp(res: dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_llamacpp`'s result."""
    s = res["settings"]
    pp, tg = f"pp{s['n_prompt']}", f"tg{s['n_gen']}"
    lines = [f"| model | layers | ideal × | type | MiB | {pp} tok/s (min–max) | {pp} × | {tg} tok/s (min–max) | {tg} × |",
             "|" + "---|" * 9]
    for r in res["models"]:
        for dtype, c in r["cells"].items():
            lines.append(f"| {r['model']} | {r['layers']} | {r['ideal_speedup_blocks']:.2f} | {dtype} | {c['size_mib']} | "
                         f"{c['pp']['median']:.0f} ({c['pp']['min']:.0f}–{c['pp']['max']:.0f}) | {c['pp_speedup']:.2f} | "
                         f"{c['tg']['median']:.1f} ({c['tg']['min']:.1f}–{c['tg']['max']:.1f}) | "
                         f"{c['tg_speedup']:.2f} |")
    lines.append("")
    lines.append(f"llama.cpp, {s['threads']} thread(s), {s['rounds']} alternating rounds; × = speed-up vs the first "
                 "model at the same type; ideal = decoder-block parameter ratio")
    return "\n".join(lines)


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (speed-up, perplexity) points: True where no other point is at least as fast *and* at least as
    good, and strictly better in one (the quality-vs-speed front)."""
    out = []
    for i, (s, q) in enumerate(points):
        dominated = any(j != i and s2 >= s and q2 <= q and (s2 > s or q2 < q) for j, (s2, q2) in enumerate(points))
        out.append(not dominated)
    return out


# ---------------------------------------------------------------- the cost model's calibration
def calibration_shapes(dense, unit: int) -> list[tuple[str, Any]]:
    """The shapes a cost model is fitted on: dense, shallower, narrower FFN, fewer heads, irregular
    (unaligned, per-layer) FFN widths, and depth and width together."""
    import math

    from .speedmodel import Shape

    L, f, h = dense.blocks, dense.ffn[0], dense.heads[0]
    group = h // max(dense.kv_heads[0], 1)

    def aligned(x: float) -> int:
        return max(unit, int(round(x / unit)) * unit)

    def widths(ffn, heads=None, blocks=L):
        return Shape(tuple(heads or dense.heads)[:blocks], dense.kv_heads[:blocks], tuple(ffn)[:blocks], dense.hidden,
                     dense.head_dim, dense.vocab)

    out = [("dense", dense), ("shallow", dense.with_blocks(max(1, round(0.6 * L)))),
           ("narrow ffn", widths([aligned(0.5 * f)] * L))]
    if group > 1:
        out.append(("fewer heads", widths(dense.ffn, [h // group] * L)))
    odd = [max(1, int(f * (1 - 0.5 * math.log(1 + i) / math.log(max(L, 2))))) for i in range(L)]
    out.append(("irregular ffn", widths([x - 1 if x % unit == 0 else x for x in odd])))
    out.append(("depth and width", widths([aligned(0.75 * f)] * L, blocks=max(1, round(0.8 * L)))))
    return out


def random_model_of(config, shape):
    """A random-weight model of ``config``'s architecture at ``shape`` (speed depends only on shapes)."""
    import copy

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from .checkpoint.width import apply_widths
    from .models import get_adapter

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = shape.blocks
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[: shape.blocks]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    a = get_adapter(model)
    apply_widths(a, {"num_attention_heads": list(shape.heads), "num_key_value_heads": list(shape.kv_heads),
                     "intermediate_size": list(shape.ffn)})
    with torch.no_grad():
        for block in a.layers:
            for lin in a.linear_roles(block).values():
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
    if len(set(zip(shape.heads, shape.kv_heads, shape.ffn, strict=True))) == 1:
        a.set_uniform_widths(shape.heads[0], shape.kv_heads[0], shape.ffn[0])
    return model


def calibrate(spec: str | None, runtime: str, dtype: str = "f16", threads: int = 1, rounds: int = 2,
              device: str | None = None, n_prompt: int = 512, n_gen: int = 128):
    """Fit and cache the cost model of ``spec``'s architecture in ``runtime`` on this machine."""
    import copy

    import torch

    from .eval import llamacpp
    from .eval.speed import bench_model
    from .loading import model_config
    from .models import get_adapter
    from .speedmodel import (
        CostModel,
        Shape,
        align_unit,
        architecture_key,
        cost_dtype,
        machine_key,
        save_cost_model,
    )

    check_runtime(runtime, [dtype] if runtime == "llamacpp" else ())
    config = model_config(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    dense = Shape.of(get_adapter(meta))
    shapes = calibration_shapes(dense, align_unit(runtime, dtype))
    kind = "cpu" if runtime == "llamacpp" else torch.device(device).type
    cm = CostModel(runtime=runtime, dtype=cost_dtype(runtime, dtype, kind), architecture=architecture_key(config),
                   machine=machine_key(), threads=threads, n_prompt=n_prompt, n_gen=n_gen, device=kind)
    if runtime == "llamacpp":
        from .checkpoint.gguf import export_gguf
        from .loading import load_tokenizer

        tok = load_tokenizer(spec)  # llama.cpp loads no file without its vocabulary
        with tempfile.TemporaryDirectory(prefix="fusegpt-calibrate-") as tmp:
            files = {}
            for i, (name, shape) in enumerate(shapes):
                model = random_model_of(config, shape)
                files[name] = (export_gguf(model, tok, Path(tmp) / f"{i}.gguf", dtype=dtype, threads=threads),
                               shape.vocab)
                del model
            got = llamacpp.alternating(files, rounds, threads, n_prompt, n_gen)
        for name, shape in shapes:
            cm.samples.append({"name": name, "shape": shape.to_dict(), "pp": n_prompt / got[name]["pp"]["median"],
                               "tg": n_gen / got[name]["tg"]["median"]})
    else:
        torch.set_num_threads(threads)
        tdt = torch.float32 if kind == "cpu" else torch.bfloat16
        models = [(name, shape, random_model_of(config, shape).to(device=device, dtype=tdt)) for name, shape in shapes]
        times: dict[str, dict[str, list[float]]] = {n: {"pp": [], "tg": []} for n, _, _ in models}
        for r in range(rounds):
            for name, _, model in models:
                row = bench_model(model, (1,), (n_prompt,), n_gen, warmup=1 if r == 0 else 0, repeats=1)["rows"][0]
                times[name]["pp"] += row["times"]["prefill"]
                times[name]["tg"] += row["times"]["decode"]
        import statistics

        for name, shape, _ in models:
            cm.samples.append({"name": name, "shape": shape.to_dict(), "pp": statistics.median(times[name]["pp"]),
                               "tg": statistics.median(times[name]["tg"])})
    cm.fit()
    path = save_cost_model(cm)
    logger.info("cost model saved to %s\n%s", path, cm.describe())
    return cm
