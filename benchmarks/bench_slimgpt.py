"""SlimGPT on the embedded SmolLM2-135M: ablations (−GCD, −DGS), the magnitude baseline and the five
pruning-ratio schedules at 20% and 50% decoder-parameter reduction, on the same seeded calibration.

Measures per variant: perplexity on ``wiki`` (test split) and ``news`` (GPTQ protocol, seqlen 512,
capped at ``--max-tokens`` per source), pruning wall time and peak memory (process RSS on CPU),
parameters, and speed of the pruned model against dense at batch 1: prefill tokens/s on a
512-token sequence and greedy decode tokens/s (KV cache) for ``--decode-tokens`` new tokens.

    flock /tmp/fusegpt-cpu.lock .venv/bin/python benchmarks/bench_slimgpt.py

Writes ``benchmarks/out/slimgpt.json`` (resumable: finished variants are skipped) and
``benchmarks/results_slimgpt.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fusegpt import EvalConfig, compress, config_for, evaluate, load_model
from fusegpt.models import get_adapter
from fusegpt.utils import count_params
from fusegpt.width import decoder_params

logger = logging.getLogger("bench_slimgpt")
ROOT = Path(__file__).resolve().parent

# name -> (method, settings)
VARIANTS: dict[str, tuple[str, dict]] = {
    "slimgpt (log-increase)": ("slimgpt", {}),
    "magnitude (no OBS)": ("magnitude", {}),
    "−GCD": ("slimgpt", {"gcd": False}),
    "−DGS": ("slimgpt", {"dgs": False}),
    # the other pruning-ratio schedules
    "uniform": ("slimgpt", {"schedule": "uniform"}),
    "linear-increase": ("slimgpt", {"schedule": "linear_increase"}),
    "log-decrease": ("slimgpt", {"schedule": "log_decrease"}),
    "linear-decrease": ("slimgpt", {"schedule": "linear_decrease"}),
    # the width peer LLM-Pruner (its own uniform ratio, first 4 / last 2 blocks kept)
    "llm-pruner (Taylor)": ("llm-pruner", {}),
    "llm-pruner (vector)": ("llm-pruner", {"taylor": "vector"}),
    # the width peer SliceGPT: at the same decoder budget, and at the paper's slicing (d' = (1 − s)·D)
    "slicegpt": ("slicegpt", {}),
    "slicegpt (paper slicing)": ("slicegpt", {"target": "dim"}),
}
CORE = ("slimgpt (log-increase)", "magnitude (no OBS)", "−GCD", "−DGS")


@torch.no_grad()
def speed(model, vocab: int, prefill: int = 512, decode: int = 32, repeats: int = 2) -> dict[str, float]:
    """Batch-1 prefill tokens/s (one forward of ``prefill`` tokens) and greedy decode tokens/s (KV cache)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, prefill), generator=g)
    model(ids[:, :32], use_cache=False)  # warm-up
    pre = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids, use_cache=False)
        pre.append(prefill / (time.perf_counter() - t))
    dec = []
    prompt = ids[:, :16]
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False, use_cache=True,
                             pad_token_id=0)
        dec.append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t))
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec)}


def _cache_token_streams() -> None:
    """Tokenize each (source, split) once for the whole benchmark (every variant uses the same tokenizer)."""
    import fusegpt.data.sources as sources

    original = sources.token_stream
    cache: dict = {}

    def cached(tokenizer, source, split, joiner="\n\n"):
        key = (source, split, joiner)
        if key not in cache:
            cache[key] = original(tokenizer, source, split, joiner)
        return cache[key]

    sources.token_stream = cached


def run_variant(name: str, sparsity: float | None, args, eval_cfg: EvalConfig) -> dict:
    model, tok = load_model(args.model)
    model.eval()
    torch.set_num_threads(args.threads)
    dec0 = decoder_params(get_adapter(model))
    row: dict = {"variant": name, "sparsity": sparsity}
    if sparsity is None:
        row.update(prune_s=0.0, peak_mb=None)
    else:
        method, settings = VARIANTS[name]
        cfg = config_for(method, sparsity=sparsity, calib_source=args.calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=args.seed, **settings)
        model, report = compress(model, tok, cfg, model_name=args.model or "embedded:SmolLM2-135M-Instruct")
        d = report.steps[0].details
        row.update(prune_s=round(report.wall_time_s, 1), peak_mb=report.peak_memory_mb,
                   achieved=d["sparsity_achieved"], r_max=d.get("r_max"), sliced_dim=d.get("sliced_dim"),
                   layers=[{k: x[k] for k in ("layer", "ratio", "heads", "kv_heads", "ffn", "energy_kept_out")
                            if k in x} for x in d["layers"]],
                   config=report.steps[0].config)
    row["params"] = count_params(model)
    row["decoder_params"] = decoder_params(get_adapter(model))
    row["decoder_reduction"] = round(1 - row["decoder_params"] / dec0, 4)
    t = time.perf_counter()
    row["ppl"] = evaluate(model, tok, eval_cfg)
    row["eval_s"] = round(time.perf_counter() - t, 1)
    row.update(speed(model, model.config.vocab_size, args.prefill_tokens, args.decode_tokens))
    if args.heal and sparsity is not None:  # recovery fine-tuning (cpu preset), then evaluate again
        from fusegpt import HealConfig, heal

        t = time.perf_counter()
        model, rec = heal(model, tok, HealConfig(preset="cpu", seed=args.seed))
        row.update(ppl_healed=evaluate(model, tok, eval_cfg), heal_s=round(time.perf_counter() - t, 1),
                   heal={k: rec[k] for k in ("loss_before", "loss_after", "steps") if k in rec})
    return row


@torch.no_grad()
def interleaved_speed(args, rounds: int = 5) -> dict:
    """Dense vs width-pruned speed measured in alternation (fair under a shared, noisy CPU).

    The pruned models come from the magnitude baseline: it keeps exactly the widths SlimGPT
    plans (the plan depends only on the geometry, schedule and budget), and prunes instantly.
    """
    torch.set_num_threads(args.threads)
    models = {"dense": load_model()[0].eval()}
    for s in args.sparsities:
        m, tok = load_model()
        models[f"pruned {int(round(100 * s))}%"] = compress(m.eval(), tok, config_for("magnitude", sparsity=s))[0]
    runs: dict[str, list[dict]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            runs[k].append(speed(m, m.config.vocab_size, args.prefill_tokens, args.decode_tokens, repeats=1))
    out = {}
    for k, rs in runs.items():
        out[k] = {f: statistics.median(r[f] for r in rs) for f in ("prefill_tok_s", "decode_tok_s")}
        out[k]["params"] = count_params(models[k])
    return out


def markdown(results: dict, args, cmd: str) -> str:
    dense = results.get("dense")
    lines = [
        f"# Width pruning on {args.model or 'the embedded SmolLM2-135M-Instruct'} (CPU)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Calibration: {args.nsamples} × {args.seqlen} tokens of `{args.calib}` (seed {args.seed}), the same windows "
        f"for every variant. Perplexity: GPTQ protocol, seqlen {args.eval_seqlen}, first {args.max_tokens} tokens "
        f"of each source (`wiki` test split, `news` test split). Sparsity = fraction of decoder-block parameters "
        f"removed (embeddings and LM head untouched, except by SliceGPT, which slices the embeddings and unties the "
        f"head). Speed: batch 1, prefill of "
        f"{args.prefill_tokens} tokens and greedy decode of {args.decode_tokens} tokens with KV cache, median of 2, "
        f"{args.threads} CPU threads on a shared 2-core machine (noisy; compare within a run). Peak memory: process "
        f"RSS during pruning.",
        "",
    ]
    head = ("| variant | decoder −% | params | ppl wiki | ppl news | healed wiki / news | prune s | peak MB | "
            "prefill tok/s | decode tok/s |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"

    def fmt(r: dict) -> str:
        mb = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "–"
        healed = f"{r['ppl_healed']['wiki']:.2f} / {r['ppl_healed']['news']:.2f}" if r.get("ppl_healed") else "–"
        return (f"| {r['variant']} | {100 * r['decoder_reduction']:.1f} | {r['params'] / 1e6:.1f}M | "
                f"{r['ppl']['wiki']:.2f} | {r['ppl']['news']:.2f} | {healed} | {r['prune_s']:.0f} | {mb} | "
                f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")

    for s in args.sparsities:
        lines += [f"## {int(round(100 * s))}% of the decoder parameters", "", head, sep]
        if dense:
            lines.append(fmt(dense))
        for name in args.variants:
            r = results.get(f"{name}@{s}")
            if r:
                lines.append(fmt(r))
        lines.append("")
    sp = results.get("speed_interleaved")
    if sp:
        lines += ["## Speed, dense vs pruned measured in alternation", "",
                  f"Batch 1, {args.threads} thread(s); median of 5 alternating rounds (prefill {args.prefill_tokens} "
                  f"tokens; greedy decode {args.decode_tokens} tokens with KV cache). Command: "
                  f"`{results.get('speed_interleaved_command', '')}`", "",
                  "| model | params | prefill tok/s | decode tok/s | prefill × dense | decode × dense |",
                  "|---|---:|---:|---:|---:|---:|"]
        d0 = sp["dense"]
        for k, r in sp.items():
            lines.append(f"| {k} | {r['params'] / 1e6:.1f}M | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{r['prefill_tok_s'] / d0['prefill_tok_s']:.2f} | {r['decode_tok_s'] / d0['decode_tok_s']:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct (e.g. gemma3-270m)")
    p.add_argument("--heal", action="store_true", help="also heal each pruned model (LoRA, cpu preset) and evaluate")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calib", default="news")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "out" / "slimgpt.json"))
    p.add_argument("--md", default=str(ROOT / "results_slimgpt.md"))
    p.add_argument("--fresh", action="store_true", help="ignore finished variants in --out")
    p.add_argument("--speed-only", action="store_true",
                   help="only the alternating dense-vs-pruned speed table (added to --out and --md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    _cache_token_streams()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {} if args.fresh or not out.is_file() else json.loads(out.read_text())["results"]
    eval_cfg = EvalConfig(data=("wiki", "news"), seqlen=args.eval_seqlen, max_tokens=args.max_tokens)
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_slimgpt.py " + shlex.join(argv or sys.argv[1:])
    core = [n for n in args.variants if n in CORE]
    rest = [n for n in args.variants if n not in CORE]  # the schedules run after the ablations
    if args.speed_only:  # keep the main run's settings and command for the rest of the page
        prev = json.loads(out.read_text()) if out.is_file() else {}
        main_args = argparse.Namespace(**{**vars(args), **prev.get("settings", {})})
        main_cmd = prev.get("command", cmd)
        results["speed_interleaved"] = interleaved_speed(args)
        results["speed_interleaved_command"] = cmd.strip()
        out.write_text(json.dumps({"settings": vars(main_args), "command": main_cmd, "results": results},
                                  indent=1) + "\n")
        Path(args.md).write_text(markdown(results, main_args, main_cmd.strip()))
        print(markdown(results, main_args, main_cmd.strip()))
        return 0
    jobs = [("dense", None)] + [(n, s) for names in (core, rest) for s in args.sparsities for n in names]
    for name, s in jobs:
        key = name if s is None else f"{name}@{s}"
        if key in results:
            continue
        logger.info("running %s", key)
        results[key] = run_variant(name, s, args, eval_cfg)
        r = results[key]
        logger.info("%s: ppl %s, prune %.0fs, decode %.1f tok/s", key, {k: round(v, 2) for k, v in r["ppl"].items()},
                    r["prune_s"], r["decode_tok_s"])
        out.write_text(json.dumps({"settings": vars(args), "command": cmd, "results": results}, indent=1) + "\n")
        Path(args.md).write_text(markdown(results, args, cmd.strip()))
    print(markdown(results, args, cmd.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
