"""Speed and memory, dense vs pruned: parameters, prefill latency, decode tokens/s, peak memory.

Every measurement runs ``warmup`` untimed times, then ``repeats`` timed times; the median and
the spread (min, max) are reported. Prefill = one forward over ``batch × length`` prompt
tokens (building the KV cache). Decode = ``decode_tokens`` greedy steps, one token per sequence
per step, each run on a fresh copy of one prefill's cache (the copy is not timed); tokens/s
counts ``batch × decode_tokens`` tokens. Inputs are seeded random token ids.

The *ideal* speed-up of a pruned model over the baseline is the ratio of decoder-block
parameters (what depth and width pruning remove); embeddings and the LM head are not pruned,
so the whole-model parameter ratio is reported too. Peak memory: the CUDA allocator's peak on
GPU; on CPU, the weights' bytes (exact) and the process's peak RSS during the measurements
(coarse: it includes everything the process holds).
"""

from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..utils import PeakMemory, count_params

logger = logging.getLogger(__name__)


def _cache_name(model) -> str:
    """The KV-cache argument and output field: ``cache`` in newer transformers, ``past_key_values``
    before (the old name now prints a FutureWarning on every decode step)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def _measure(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def param_summary(model) -> dict[str, Any]:
    """Whole-model and decoder-block parameters, layers, weight bytes."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    blocks = sum(p.numel() for p in adapter.layers.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": count_params(model), "block_params": blocks, "layers": adapter.num_layers,
            "weights_mb": round(weight_bytes / 2**20, 1), "dtype": str(next(model.parameters()).dtype)}


@torch.no_grad()
def bench_model(
    model,
    batch_sizes: Sequence[int] = (1, 4),
    lengths: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one in-memory model; returns its parameters and one row per (batch, length)."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    ctx = getattr(model.config, "max_position_embeddings", None)
    was_training = model.training
    model.eval()
    rows = []
    for bs in batch_sizes:
        for n in lengths:
            if ctx and n + decode_tokens > ctx:
                logger.warning("skipping length %d: with %d decode tokens it exceeds the context %d", n,
                               decode_tokens, ctx)
                continue
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (bs, n), generator=g).to(device)

            def prefill(ids=ids):
                return model(ids, use_cache=True)

            with PeakMemory(device) as mem:
                pre_times = _measure(prefill, warmup, repeats, device)
                first = model(ids, use_cache=True)  # one prefill; each decode run starts from a copy of its cache

                kw = _cache_name(model)

                def decode(first=first, kw=kw):
                    past, nxt = copy.deepcopy(getattr(first, kw)), first.logits[:, -1:].argmax(-1)
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(decode_tokens):
                        out = model(nxt, use_cache=True, **{kw: past})
                        past, nxt = getattr(out, kw), out.logits[:, -1:].argmax(-1)
                    _sync(device)
                    return time.perf_counter() - t0

                for _ in range(warmup):
                    decode()
                dec_times = [decode() for _ in range(repeats)]
                del first
            rows.append(_row(bs, n, decode_tokens, pre_times, dec_times, mem.peak_mb, device))
            logger.info("batch %d, length %d: prefill %.3fs, decode %.1f tok/s", bs, n,
                        rows[-1]["prefill_s"]["median"], rows[-1]["decode_tokens_per_s"]["median"])
    model.train(was_training)
    return {**param_summary(model), "device": str(device), "rows": rows}


def _row(bs: int, n: int, decode_tokens: int, pre_times: list[float], dec_times: list[float], peak_mb: float,
         device: torch.device) -> dict[str, Any]:
    """One (batch, length) measurement from its raw times (kept, so rounds can be pooled)."""
    pre, dec = _stats(pre_times), _stats(dec_times)
    tps = [bs * decode_tokens / t for t in dec_times]
    return {"batch": bs, "length": n, "prefill_s": pre, "prefill_tokens_per_s": bs * n / pre["median"],
            "decode_s": dec, "decode_tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
            "peak_memory_mb": round(peak_mb, 1),
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process RSS",
            "times": {"prefill": pre_times, "decode": dec_times}}


def pool_rounds(runs: list[dict[str, Any]], decode_tokens: int) -> dict[str, Any]:
    """One model's result from several rounds of :func:`bench_model`: every round's times pooled per row."""
    out = dict(runs[0])
    rows = []
    for i, row in enumerate(runs[0]["rows"]):
        pre = [t for r in runs for t in r["rows"][i]["times"]["prefill"]]
        dec = [t for r in runs for t in r["rows"][i]["times"]["decode"]]
        peak = max(r["rows"][i]["peak_memory_mb"] for r in runs)
        rows.append(_row(row["batch"], row["length"], decode_tokens, pre, dec, peak, torch.device(runs[0]["device"])))
    out["rows"] = rows
    return out


def compare(results: list[dict[str, Any]]) -> None:
    """Add speed-ups against the first model, and the ideal from the parameter ratios (in place)."""
    base = results[0]
    for r in results:
        r["ideal_speedup_blocks"] = base["block_params"] / r["block_params"]
        r["param_ratio_model"] = r["params"] / base["params"]
        base_rows = {(b["batch"], b["length"]): b for b in base["rows"]}
        for row in r["rows"]:
            b = base_rows.get((row["batch"], row["length"]))
            if b is None:
                continue
            row["prefill_speedup"] = b["prefill_s"]["median"] / row["prefill_s"]["median"]
            row["decode_speedup"] = row["decode_tokens_per_s"]["median"] / b["decode_tokens_per_s"]["median"]


def bench_models(
    specs: Sequence[str | None],
    batch_sizes: Sequence[int] = (1, 4),
    lengths: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    device: str | None = None,
    threads: int | None = None,
    loader: Callable[[str | None, str], tuple[Any, Any]] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Time every model (``None`` = the embedded one) and compare to the first.

    ``rounds > 1``: all models are loaded at once and measured in alternating rounds (A B A B ...),
    ``repeats`` each per round, so that load on a shared machine hits every model alike (the times
    of all rounds are pooled); ``rounds=1`` loads, times and frees one model after the other.
    """
    from ..loading import load_model
    from ..report import library_versions

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    loader = loader or (lambda spec, dev: load_model(spec, device=dev))
    results = []
    if rounds <= 1:
        for spec in specs:
            model, _tok = loader(spec, device)
            logger.info("bench %s on %s", spec or "embedded", device)
            r = bench_model(model, batch_sizes, lengths, decode_tokens, warmup, repeats)
            r["model"] = spec or "embedded:SmolLM2-135M-Instruct"
            results.append(r)
            del model
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    else:
        models = [loader(spec, device)[0] for spec in specs]
        runs: list[list[dict[str, Any]]] = [[] for _ in models]
        for k in range(rounds):
            for i, model in enumerate(models):
                runs[i].append(bench_model(model, batch_sizes, lengths, decode_tokens, warmup if k == 0 else 0,
                                           repeats))
        for spec, r in zip(specs, runs, strict=True):
            results.append({**pool_rounds(r, decode_tokens), "model": spec or "embedded:SmolLM2-135M-Instruct"})
    compare(results)
    return {
        "models": results,
        "runtime": "torch",
        "settings": {"batch_sizes": list(batch_sizes), "lengths": list(lengths), "decode_tokens": decode_tokens,
                     "warmup": warmup, "repeats": repeats, "rounds": rounds, "device": device,
                     "threads": torch.get_num_threads()},
        "versions": library_versions(),
        "note": "median over repeats; spread = min..max. Ideal speed-up = ratio of decoder-block parameters.",
    }


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table: one line per model × (batch, length)."""
    head = ("model", "layers", "params", "ideal×", "batch", "len", "prefill s (min-max)", "prefill×",
            "decode tok/s (min-max)", "decode×", "peak MB")
    lines = []
    for r in res["models"]:
        for row in r["rows"]:
            p, d = row["prefill_s"], row["decode_tokens_per_s"]
            lines.append((
                r["model"], str(r["layers"]), f"{r['params']:,}", f"{r['ideal_speedup_blocks']:.2f}",
                str(row["batch"]), str(row["length"]),
                f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})", f"{row.get('prefill_speedup', 1.0):.2f}",
                f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})", f"{row.get('decode_speedup', 1.0):.2f}",
                f"{row['peak_memory_mb']:.0f}",
            ))
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    s = res["settings"]
    out = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines), "",
           f"device {s['device']}, {s['threads']} threads; warm-up {s['warmup']}, {s['repeats']} repeats, "
           f"{s['decode_tokens']} decode tokens; × = speed-up vs the first model, ideal = decoder-block param ratio"]
    return "\n".join(out)


def bench_to_markdown(res: dict[str, Any]) -> str:
    """The same table as Markdown."""
    lines = ["| model | layers | params | ideal × | batch | len | prefill s (min–max) | prefill × | "
             "decode tok/s (min–max) | decode × | peak MB |", "|" + "---|" * 11]
    for r in res["models"]:
        for row in r["rows"]:
            p, d = row["prefill_s"], row["decode_tokens_per_s"]
            lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['ideal_speedup_blocks']:.2f} | "
                         f"{row['batch']} | {row['length']} | {p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f}) | "
                         f"{row.get('prefill_speedup', 1.0):.2f} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | "
                         f"{row.get('decode_speedup', 1.0):.2f} | {row['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"
