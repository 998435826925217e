"""Quality vs speed on the embedded model: width variants (per-layer, aligned, uniform) and depth methods,
perplexity and measured speed-ups in llama.cpp and PyTorch (issue "Faster, not just smaller").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_speed.py --runs /work/runs/speed \\
        --base shortgpt25=/work/runs/base/shortgpt25 --base fusegpt25=/work/runs/base/fusegpt25 \\
        --base replaceme25s2=/work/runs/base/replaceme25s2 --base slimgpt20=/work/runs/base/slimgpt20

1. Prunes every variant of :data:`VARIANTS` that ``--runs`` does not hold yet (``fusegpt.prune``, the
   ``cpu`` preset, perplexity on ``wiki`` and ``news``, 16,384 tokens at seqlen 512); ``--base``
   adds checkpoints pruned elsewhere (their report.json gives the perplexity).
2. llama.cpp: every model (dense first) exported at ``--dtypes`` and timed as llama-bench does (pp512,
   tg128) on ``--threads`` threads, all files in ``--rounds`` alternating rounds (``fusegpt.bench``).
3. PyTorch (CPU, fp32): prefill of 512 tokens and 32 greedy decode steps, batch 1, the ``--torch``
   models in alternating rounds.

Writes ``--out`` (JSON, resumable: the pruning results and each timing stage are kept) and prints the
Markdown tables, with the Pareto front of (speed-up, wiki perplexity) per runtime and type.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fusegpt import EvalConfig, configs_for, prune  # noqa: E402
from fusegpt.bench import bench_llamacpp, pareto  # noqa: E402
from fusegpt.eval.speed import bench_models  # noqa: E402

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("bench_speed")

# name: (method, sparsity, settings)
VARIANTS = {
    "slimgpt20-a32": ("slimgpt", 0.2, {"align": 32}),
    "slimgpt20-a64": ("slimgpt", 0.2, {"align": 64}),
    "slimgpt20-a128": ("slimgpt", 0.2, {"align": 128}),
    "slimgpt20-a256": ("slimgpt", 0.2, {"align": 256}),
    "slimgpt20-uniform": ("slimgpt", 0.2, {"layout": "uniform"}),
    "slimgpt20-uniform-a64": ("slimgpt", 0.2, {"layout": "uniform", "align": 64}),
    "slimgpt35": ("slimgpt", 0.35, {}),
    "slimgpt35-a64": ("slimgpt", 0.35, {"align": 64}),
    "slimgpt35-a256": ("slimgpt", 0.35, {"align": 256}),
    "slimgpt35-uniform-a64": ("slimgpt", 0.35, {"layout": "uniform", "align": 64}),
    "llmpruner20": ("llm-pruner", 0.2, {}),
    "llmpruner20-a64": ("llm-pruner", 0.2, {"align": 64}),
    "llmpruner20-uniform-a64": ("llm-pruner", 0.2, {"layout": "uniform", "align": 64}),
    "llmpruner35": ("llm-pruner", 0.35, {}),
    "llmpruner35-a64": ("llm-pruner", 0.35, {"align": 64}),
    "llmpruner35-uniform-a64": ("llm-pruner", 0.35, {"layout": "uniform", "align": 64}),
}
TORCH_DEFAULT = ("slimgpt20", "slimgpt20-a64", "slimgpt20-a256", "slimgpt20-uniform-a64", "shortgpt25",
                 "llmpruner20-uniform-a64")


def _ppl(folder: Path) -> dict:
    rep = json.loads((folder / "report.json").read_text())
    return {"ppl": rep["perplexity"].get("after"), "params": rep["params_after"], "layers": rep["layers_after"],
            "wall_time_s": rep["wall_time_s"],
            "widths": [x["ffn"][1] for s in rep["steps"] for x in s["details"].get("layers", [])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder for the pruned variants")
    ap.add_argument("--base", action="append", default=[], metavar="NAME=DIR", help="a checkpoint pruned elsewhere")
    ap.add_argument("--only", default=None, help="comma list of variant names to prune (default: all)")
    ap.add_argument("--dtypes", default="f16,q8_0,q4_k_m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torch", default=",".join(TORCH_DEFAULT), help="models timed in PyTorch (besides dense)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results_speed" / "speed.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    runs = Path(args.runs)
    ev = EvalConfig(data=("wiki", "news"), seqlen=512, max_tokens=16384)
    folders: dict[str, str | None] = {"dense": None}
    for spec in args.base:
        name, _, folder = spec.partition("=")
        folders[name] = folder
    only = set(args.only.split(",")) if args.only else None
    for name, (method, sparsity, settings) in VARIANTS.items():
        if only is not None and name not in only and not (runs / name / "report.json").is_file():
            continue
        folder = runs / name
        if not (folder / "report.json").is_file():
            logger.info("pruning %s", name)
            prune(None, configs_for(method, sparsity, preset="cpu", **settings), folder, eval_config=ev)
        folders[name] = str(folder)
    for name, folder in folders.items():
        if folder is not None:
            res["models"].setdefault(name, {}).update(_ppl(Path(folder)), folder=folder)
    if "dense" not in res["models"] or "ppl" not in res["models"]["dense"]:
        from fusegpt import evaluate, load_model

        m, tok = load_model(None)
        res["models"].setdefault("dense", {}).update(ppl=evaluate(m, tok, ev), layers=30, folder=None)
        del m
    out.write_text(json.dumps(res, indent=1))
    if not args.skip_speed:
        names = list(folders)
        dtypes = args.dtypes.split(",")
        if res.get("llamacpp_names") != names or res.get("llamacpp_dtypes") != dtypes:
            lc = bench_llamacpp([folders[n] for n in names], dtypes, rounds=args.rounds, threads=args.threads,
                                names=names)
            res.update(llamacpp=lc, llamacpp_names=names, llamacpp_dtypes=dtypes)
            out.write_text(json.dumps(res, indent=1))
        tnames = ["dense", *[n for n in args.torch.split(",") if n in folders]]
        if res.get("torch_names") != tnames:
            tr = bench_models([folders[n] for n in tnames], batch_sizes=(1,), lengths=(512,), decode_tokens=32,
                              warmup=1, repeats=1, threads=args.threads, rounds=args.rounds)
            for m, n in zip(tr["models"], tnames, strict=True):
                m["model"] = n
            res.update(torch=tr, torch_names=tnames)
            out.write_text(json.dumps(res, indent=1))
    print(tables(res))
    return 0


def tables(res: dict) -> str:
    models = res["models"]
    lines = []
    if "llamacpp" in res:
        lc = res["llamacpp"]
        for dtype in lc["settings"]["dtypes"]:
            pts = [(m["model"], min(m["cells"][dtype]["pp_speedup"], m["cells"][dtype]["tg_speedup"]),
                    models[m["model"]]["ppl"]["wiki"]) for m in lc["models"]]
            front = pareto([(p[1], p[2]) for p in pts])
            lines += [f"### llama.cpp {dtype} ({lc['settings']['threads']} thread, {lc['settings']['rounds']} "
                      "alternating rounds)", "",
                      "| model | blocks | ideal × | MiB | pp512 tok/s | pp512 × | tg128 tok/s | tg128 × | ppl wiki | "
                      "ppl news | front |", "|" + "---|" * 11]
            for m, on in sorted(zip(lc["models"], front, strict=True),
                                key=lambda x: -min(x[0]["cells"][dtype]["pp_speedup"], x[0]["cells"][dtype]["tg_speedup"])):
                c = m["cells"][dtype]
                p = models[m["model"]]["ppl"]
                lines.append(f"| {m['model']} | {m['layers']} | {m['ideal_speedup_blocks']:.2f} | {c['size_mib']} | "
                             f"{c['pp']['median']:.0f} ({c['pp']['min']:.0f}–{c['pp']['max']:.0f}) | "
                             f"{c['pp_speedup']:.2f} | {c['tg']['median']:.1f} ({c['tg']['min']:.1f}–"
                             f"{c['tg']['max']:.1f}) | {c['tg_speedup']:.2f} | {p['wiki']:.2f} | {p['news']:.2f} | "
                             f"{'★' if on else ''} |")
            lines.append("")
    if "torch" in res:
        tr = res["torch"]
        lines += ["### PyTorch CPU fp32 (batch 1: prefill 512 tokens, 32 decode steps; alternating rounds)", "",
                  "| model | blocks | ideal × | prefill s | prefill × | decode tok/s | decode × | ppl wiki | ppl news |",
                  "|" + "---|" * 9]
        for m in tr["models"]:
            r = m["rows"][0]
            p = models[m["model"]]["ppl"]
            lines.append(f"| {m['model']} | {m['layers']} | {m['ideal_speedup_blocks']:.2f} | "
                         f"{r['prefill_s']['median']:.3f} | {r.get('prefill_speedup', 1):.2f} | "
                         f"{r['decode_tokens_per_s']['median']:.1f} | {r.get('decode_speedup', 1):.2f} | "
                         f"{p['wiki']:.2f} | {p['news']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
