"""Block-pruning baselines on the embedded model: ShortGPT, SLEB and MI at the same sparsity.

Prunes SmolLM2-135M-Instruct (30 blocks) by ``--sparsity`` with each method on the same seeded
calibration windows (through :func:`fusegpt.sweep.run_sweep`, which resumes finished cells of
``--sweep-dir``), and reports for dense and each method: perplexity on the ``wiki`` test split
and on ``news`` at ``--eval-seqlen`` and ``--long-seqlen``, blocks removed, pruning wall time and
peak memory. It also times one MI ranking with cached prefixes against recomputing every
candidate from the embeddings, on the dense model, and reports the ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_blocks.py --sparsity 0.25 --nsamples 4 --seqlen 128 \
        --eval-seqlen 512 --long-seqlen 2048 --max-tokens 8192

Prints a Markdown table and writes JSON to ``benchmarks/out/blocks.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from fusegpt import EvalConfig, config_for, evaluate, load_model
from fusegpt.api import calibration_for
from fusegpt.importance import mi_scores
from fusegpt.models import get_adapter
from fusegpt.sweep import cell_name, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--methods", default="shortgpt,sleb,mi")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--long-seqlen", type=int, default=2048, help="second evaluation window length (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens per source and window length")
    ap.add_argument("--sweep-dir", default="benchmarks/out/blocks-sweep", help="checkpoints; finished cells are reused")
    ap.add_argument("--out", default="benchmarks/out/blocks.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = args.methods.split(",")
    settings = dict(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, calib_source=args.calib)

    table = run_sweep(methods, [args.sparsity], args.sweep_dir, model_spec=args.model, settings=settings,
                      eval_config=EvalConfig(data=("wiki", "news"), seqlen=args.eval_seqlen, max_tokens=args.max_tokens))
    short, long_ = args.eval_seqlen, args.long_seqlen
    rows = [{"method": "dense", "layers": table["dense"]["layers"], "removed": [], "wall_time_s": None,
             "peak_memory_mb": None, "ppl": {f"{k}@{short}": v for k, v in table["dense"]["perplexity"].items()}}]
    for r in table["rows"]:
        rows.append({**{k: r[k] for k in ("method", "layers", "removed", "wall_time_s", "peak_memory_mb")},
                     "ppl": {f"{k}@{short}": v for k, v in r["perplexity"].items()}})

    dense, tok = load_model(args.model)
    if long_:
        ec = EvalConfig(data=("wiki", "news"), seqlen=long_, max_tokens=max(args.max_tokens, long_))
        for row in rows:
            model = dense if row["method"] == "dense" else \
                load_model(str(Path(args.sweep_dir) / cell_name(row["method"], args.sparsity)))[0]
            row["ppl"].update({f"{k}@{long_}": v for k, v in evaluate(model, tok, ec).items()})
            print(f"{row['method']}: {row['ppl']}", flush=True)

    # MI ranking of the dense model: cached prefixes vs recomputing every candidate from the embeddings
    calib = calibration_for(tok, config_for("mi", **settings))
    adapter = get_adapter(dense)
    timing, scores = {}, {}
    for mode, cached in (("cached", True), ("recompute", False)):
        t0 = time.perf_counter()
        scores[mode] = mi_scores(adapter, calib, cache_prefix=cached)
        timing[mode] = time.perf_counter() - t0
    same = bool(torch.allclose(scores["cached"], scores["recompute"], atol=1e-5))

    cols = [f"{src}@{s}" for s in (short, long_) if s for src in ("wiki", "news")]
    lines = [
        "| method | blocks | " + " | ".join(f"ppl {c}" for c in cols)
        + " | removed (original index, removal order) | pruning wall s | peak RSS MB |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['layers']} | " + " | ".join(f"{r['ppl'][c]:.2f}" for c in cols)
                     + f" | {r['removed'] or '-'} | {r['wall_time_s'] if r['wall_time_s'] is not None else '-'}"
                     f" | {r['peak_memory_mb'] or '-'} |")
    lines += ["", f"MI ranking of the dense 30-block model on {args.nsamples}×{args.seqlen} tokens: cached prefixes "
              f"{timing['cached']:.1f} s, recomputing from the embeddings {timing['recompute']:.1f} s, ratio "
              f"{timing['recompute'] / timing['cached']:.2f}× (identical scores: {same})."]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "mi_timing_s": timing,
                                          "mi_identical": same, "table": text}, indent=2))


if __name__ == "__main__":
    main()
