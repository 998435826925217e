"""Our GGUF exports in the real llama.cpp: file size, perplexity against transformers, speed.

For each model (``--model NAME=DIR``; ``dense`` = the embedded SmolLM2-135M-Instruct) and each
``--dtypes`` entry: export with ``fusegpt.checkpoint.gguf.export_gguf``, then

* perplexity on ``wiki`` and ``news`` with the GPTQ protocol (the same non-overlapping windows of
  ``--seqlen`` tokens, first ``--max-tokens`` tokens of each test split) in transformers (fp32, the
  checkpoint itself; ``fusegpt.load_pruned`` for width-pruned ones) and in llama.cpp
  (llama-cpp-python, every position's logits of each window);
* llama.cpp speed as ``llama-bench`` defines it: ``pp512`` = tokens/s of one 512-token prompt
  batch, ``tg128`` = tokens/s generating 128 tokens one at a time (best of ``--repeats``), on
  ``--threads`` threads.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gguf.py \\
        --model shortgpt25=runs/shortgpt25 --model fusegpt25=runs/fusegpt25 --model slimgpt20=runs/slimgpt20

Needs llama-cpp-python (``scripts/setup_llamacpp.sh``). Writes ``--out`` (JSON; resumable: finished
cells are skipped) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusegpt.checkpoint.gguf import export_gguf, gguf_arch
from fusegpt.data import eval_tokens
from fusegpt.eval import llamacpp
from fusegpt.eval.perplexity import perplexity
from fusegpt.loading import load_model

logger = logging.getLogger("bench_gguf")
ROOT = Path(__file__).resolve().parent


def llama_cpp_perplexity(llama_cpp, path: Path, tokens: torch.Tensor, seqlen: int, threads: int) -> float:
    """GPTQ-protocol perplexity in llama.cpp (:func:`fusegpt.eval.llamacpp.perplexity`)."""
    return llamacpp.perplexity(path, tokens, seqlen, threads)


def llama_cpp_speed(llama_cpp, path: Path, threads: int, repeats: int, vocab: int) -> dict[str, float]:
    """``pp512`` and ``tg128`` tokens/s (llama-bench's definitions), best of ``repeats``."""
    runs = [llamacpp.speed_round(path, threads, 512, 128, vocab) for _ in range(repeats)]
    return {"pp512": max(r["pp"] for r in runs), "tg128": max(r["tg"] for r in runs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="a checkpoint to measure (repeatable); 'dense' (the embedded model) is always measured")
    ap.add_argument("--dtypes", default="f16,q8_0", help="comma-separated export types")
    ap.add_argument("--data", default="wiki,news")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "out" / "gguf.json"))
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure pp512/tg128 of every model and type in --out, in alternating rounds (for idle cores)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench_gguf needs llama-cpp-python: bash scripts/setup_llamacpp.sh")
    models = {"dense": None}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        if not folder or not Path(folder).is_dir():
            sys.exit(f"--model {spec!r}: give NAME=DIR with an existing checkpoint folder")
        models[name] = folder
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    torch.set_num_threads(args.threads)
    sources = args.data.split(",")
    if args.speed_only:
        speed_rounds(llama_cpp, models, results, args)
        out.write_text(json.dumps(results, indent=1))
        print(table(results, sources))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        for name, folder in models.items():
            model, tok = load_model(folder)
            row = results.setdefault(name, {"model": folder or "embedded", "arch": gguf_arch(model),
                                            "blocks": model.config.num_hidden_layers, "cells": {}})
            streams = {s: eval_tokens(tok, s, args.seqlen)[: args.max_tokens] for s in sources}
            if "transformers" not in row:
                t = time.perf_counter()
                row["transformers"] = {s: perplexity(model, streams[s], args.seqlen, desc=f"{name} {s}")
                                       for s in sources}
                row["transformers_s"] = time.perf_counter() - t
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
            for dtype in args.dtypes.split(","):
                if dtype in row["cells"]:
                    continue
                path = export_gguf(model, tok, Path(tmp) / f"{name}-{dtype}.gguf", dtype=dtype, overwrite=True)
                cell = {"size_mib": path.stat().st_size / 2**20}
                cell["ppl"] = {s: llama_cpp_perplexity(llama_cpp, path, streams[s], args.seqlen, args.threads)
                               for s in sources}
                cell.update(llama_cpp_speed(llama_cpp, path, args.threads, args.repeats, model.config.vocab_size))
                row["cells"][dtype] = cell
                logger.info("%s %s: %s", name, dtype, cell)
                out.write_text(json.dumps(results, indent=1))
                path.unlink()
            del model
    print(table(results, sources))
    return 0


def speed_rounds(llama_cpp, models: dict, results: dict, args) -> None:
    """Export every (model, type) once, then measure them in ``args.repeats`` alternating rounds; keep the best."""
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        files = {}
        for name, folder in models.items():
            model, tok = load_model(folder)
            for dtype in results.get(name, {}).get("cells", {}):
                files[(name, dtype)] = (export_gguf(model, tok, Path(tmp) / f"{name}-{dtype}.gguf", dtype=dtype,
                                                    overwrite=True), model.config.vocab_size)
            del model
        best: dict = {}
        for _ in range(args.repeats):
            for key, (path, vocab) in files.items():
                s = llama_cpp_speed(llama_cpp, path, args.threads, 1, vocab)
                best[key] = {k: max(v, best.get(key, {}).get(k, 0.0)) for k, v in s.items()}
        for (name, dtype), s in best.items():
            results[name]["cells"][dtype].update(s, speed_threads=args.threads, speed="alternating rounds")


def table(results: dict, sources: list[str]) -> str:
    head = ("| model | GGUF arch | blocks | type | file MiB | " + " | ".join(
        f"ppl {s}: transformers / llama.cpp (Δ)" for s in sources) + " | pp512 tok/s | tg128 tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = results.get("dense", {}).get("cells", {})
    for name, row in results.items():
        for dtype, c in row["cells"].items():
            ppl = " | ".join(f"{row['transformers'][s]:.3f} / {c['ppl'][s]:.3f} "
                             f"({100 * (c['ppl'][s] / row['transformers'][s] - 1):+.2f}%)" for s in sources)
            speed = [f"{c[k]:.0f}" + (f" ({c[k] / dense[dtype][k]:.2f}×)" if name != "dense" and dtype in dense else "")
                     for k in ("pp512", "tg128")]
            lines.append(f"| {name} | {row['arch']} | {row['blocks']} | {dtype} | {c['size_mib']:.1f} | {ppl} | "
                         f"{speed[0]} | {speed[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
