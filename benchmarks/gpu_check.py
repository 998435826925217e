"""The GPU check: every method on the embedded model on CUDA in bf16, with timings, in one call.

    .venv/bin/python benchmarks/gpu_check.py                 # on a machine with a GPU (about 5-8 minutes)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick   # the same path on a CPU, tiny settings

For each method (the ``cpu`` preset's calibration sizes, which a GPU runs in seconds to a minute;
FuseGPT / MI+FT with 2 epochs per group) it prunes SmolLM2-135M-Instruct through ``fusegpt.prune``
(``--device cuda``, bf16 weights, Hessians and trained factors in fp32), evaluates perplexity on
``wiki`` and ``news`` (8,192 tokens at seqlen 512), heals the FuseGPT model by KD for one epoch, and
times dense vs pruned in PyTorch CUDA bf16 at batch 1 and batch 8 (prefill 512 tokens, 32 decode
steps, alternating rounds). Stops starting new work past ``--budget-s`` (default 480 s) so the whole
call stays under 10 minutes; what ran is written to ``--out`` (JSON) and to the "GPU check" section of
``benchmarks/RESULTS.md`` (replaced between its markers), what did not is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fusegpt import EvalConfig, HealConfig, Placement, configs_for, prune  # noqa: E402

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
METHODS = [  # (label, method, sparsity, settings)
    ("shortgpt", "shortgpt", 0.25, {}),
    ("sleb", "sleb", 0.25, {}),
    ("mi", "mi", 0.25, {}),
    ("replaceme spans=2", "replaceme", 0.25, {"spans": 2}),
    ("mi+ft", "mi+ft", 0.25, {"epochs": 2}),
    ("fusegpt", "fusegpt", 0.25, {"epochs": 2}),
    ("slimgpt", "slimgpt", 0.2, {}),
    ("slimgpt uniform align 64", "slimgpt", 0.2, {"layout": "uniform", "align": 64}),
    ("llm-pruner", "llm-pruner", 0.2, {}),
    ("slicegpt", "slicegpt", 0.2, {}),
    ("magnitude", "magnitude", 0.2, {}),
]
QUICK = {"nsamples": 2, "seqlen": 64}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny calibration and evaluation (a smoke test of the path)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--methods", default=None,
                    help="comma list of the labels to run (default: all): " + ", ".join(m[0] for m in METHODS))
    ap.add_argument("--out", default=str(ROOT / "results_gpu" / "gpu_check.json"))
    ap.add_argument("--no-results-md", action="store_true", help="do not rewrite the GPU section of RESULTS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()
    chosen = METHODS
    if args.methods:
        want = [m.strip() for m in args.methods.split(",")]
        unknown = sorted(set(want) - {m[0] for m in METHODS})
        if unknown:
            raise SystemExit(f"gpu_check: unknown --methods {unknown}; choose from {[m[0] for m in METHODS]}")
        chosen = [m for m in METHODS if m[0] in want]
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on the GPU machine (or --device cpu --quick)")
    dtype = torch.bfloat16 if cuda else torch.float32
    place = Placement(device=args.device, dtype=dtype)
    ev = EvalConfig(data=("wiki", "news"), seqlen=128 if args.quick else 512,
                    max_tokens=512 if args.quick else 8192)
    rows, skipped = [], []
    env = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "quick": args.quick, "eval_tokens": ev.max_tokens, "eval_seqlen": ev.seqlen}
    with tempfile.TemporaryDirectory(prefix="fusegpt-gpu-check-") as tmp:
        fused = None
        for label, method, sparsity, extra in chosen:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(label)
                continue
            settings = {"preset": "cpu", **extra, **(QUICK if args.quick else {})}
            if args.quick and method == "replaceme":  # its least-squares map needs more tokens than the hidden size
                settings.update(nsamples=16)
            if args.quick and method in ("fusegpt", "mi+ft"):
                settings.update(ft_nsamples=2, ft_seqlen=64, val_nsamples=1, epochs=1)
            out = Path(tmp) / label.replace(" ", "_").replace("=", "")
            t0 = time.perf_counter()
            try:
                res = prune(None, configs_for(method, sparsity, **settings), out, placement=place, eval_config=ev)
            except Exception as e:  # noqa: BLE001 - a check script reports every failure and goes on
                rows.append({"method": label, "error": f"{type(e).__name__}: {e}"})
                continue
            r = res.report
            rows.append({"method": label, "sparsity": sparsity, "wall_s": round(time.perf_counter() - t0, 1),
                         "prune_s": round(r.wall_time_s, 1), "peak_mb": r.peak_memory_mb,
                         "ppl": r.perplexity.get("after"), "layers": r.layers_after, "params": r.params_after})
            if method == "fusegpt":
                fused = out
        dense_ppl = None
        bench = None
        if fused is not None and time.perf_counter() - t_start < args.budget_s:
            from fusegpt import api

            t0 = time.perf_counter()
            heal_cfg = HealConfig(preset="cpu", loss="kd", epochs=1,
                                  **({"nsamples": 4, "seqlen": 64} if args.quick else {}))
            rep = api.heal_checkpoint(str(fused), Path(tmp) / "healed", heal_cfg, eval_config=ev, placement=place,
                                      teacher="embedded")
            rows.append({"method": "fusegpt + KD heal", "wall_s": round(time.perf_counter() - t0, 1),
                         "ppl": rep.perplexity.get("healed"), "heal_s": rep.heal.wall_time_s if rep.heal else None})
            dense_ppl = rep.perplexity.get("before")
        if time.perf_counter() - t_start < args.budget_s:
            from fusegpt.eval.speed import bench_models

            specs = [None, *[str(p) for p in (fused, Path(tmp) / "slimgpt_uniform_align_64") if p and p.exists()]]
            bench = bench_models(specs, batch_sizes=(1, 8), lengths=(64 if args.quick else 512,), decode_tokens=8 if
                                 args.quick else 32, warmup=1, repeats=2, device=args.device, rounds=2)
        else:
            skipped.append("speed")
    result = {"env": env, "rows": rows, "skipped": skipped, "dense_ppl": dense_ppl,
              "bench": bench, "total_s": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    print(text)
    if not args.no_results_md and not args.quick:
        write_results_md(text)
    return 0


def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"GPU check on {e['device']} ({e['dtype']}, torch {e['torch']}), {res['total_s']:.0f} s in all; "
             "`python benchmarks/gpu_check.py`. Perplexity: "
             f"{e.get('eval_tokens', 8192):,} tokens per source at seqlen {e.get('eval_seqlen', 512)}.", "",
             "| method | sparsity | blocks | prune s | wall s (with eval) | peak MB | ppl wiki | ppl news |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        p = r.get("ppl") or {}
        lines.append(f"| {r['method']} | {r.get('sparsity', '')} | {r.get('layers', '')} | {r.get('prune_s', '')} | "
                     f"{r['wall_s']} | {r.get('peak_mb', '')} | {p.get('wiki', float('nan')):.2f} | "
                     f"{p.get('news', float('nan')):.2f} |")
    if res["skipped"]:
        lines += ["", f"Skipped (over the time budget): {', '.join(res['skipped'])}."]
    if res.get("bench"):
        from fusegpt.eval.speed import bench_to_markdown

        lines += ["", "Speed, CUDA bf16 (alternating rounds):", "", bench_to_markdown(res["bench"])]
    return "\n".join(lines)


def write_results_md(text: str) -> None:
    path = ROOT / "RESULTS.md"
    s = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in s and END in s:
        s = s[: s.index(BEGIN)] + block + s[s.index(END) + len(END):]
    else:
        s = s.rstrip() + "\n\n## GPU check\n\n" + block + "\n"
    path.write_text(s)


if __name__ == "__main__":
    raise SystemExit(main())
