"""``fusegpt sweep``, ``bench`` and ``report``: parse, then call the Python API
(:mod:`fusegpt.sweep`, :mod:`fusegpt.eval.speed`, :mod:`fusegpt.report_render`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data import check_source
from ..settings import EvalConfig
from .common import EMBEDDED_ALIASES, HelpFormatter, UsageError, add_settings_args, csv, merged_settings
from .evaluate import limit_of


# ---------------------------------------------------------------- sweep
def add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="prune every method × sparsity once, evaluate, write a Table-I-shaped table",
                       description="Each cell is pruned from a copy of the same dense model with the same calibration "
                                   "data and saved to DIR/<method>-<sparsity>/; finished cells (report.json present) "
                                   "are skipped, so re-running resumes.",
                       formatter_class=HelpFormatter)
    s.add_argument("--model", default=None, help="dense model (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--device", default="cpu", help="torch device")
    s.add_argument("--methods", required=True, help="comma list, e.g. shortgpt,sleb,mi,fusegpt")
    s.add_argument("--sparsity", required=True, help="comma list, e.g. 0.125,0.25,0.375")
    s.add_argument("--output", default="runs/sweep", help="sweep folder")
    add_settings_args(s, "a setting for the methods whose config has it, repeatable")
    s.add_argument("--eval-data", nargs="+", default=["wiki", "news"], help="perplexity sources")
    s.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    s.add_argument("--max-tokens", type=int, default=32768, help="cap on evaluation tokens per source")
    s.add_argument("--tasks", default=None, help="also zero-shot tasks per cell (see fusegpt eval --tasks)")
    s.add_argument("--limit", type=float, default=None, help="zero-shot examples per task")
    s.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per zero-shot task (default: the task's)")
    s.add_argument("--include-path", action="append", default=None, metavar="DIR", help="local lm-eval task YAMLs")
    s.add_argument("--no-checkpoints", action="store_true", help="keep only each cell's report.json, not its weights")
    s.add_argument("--no-plots", action="store_true", help="skip rendering the sweep's plots (needs matplotlib)")
    s.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from ..sweep import run_sweep

    try:
        sparsities = csv(args.sparsity, float)
    except ValueError:
        raise UsageError(f"--sparsity takes a comma list of numbers, got {args.sparsity!r}") from None
    methods = csv(args.methods)
    if not methods or not sparsities:
        raise UsageError("give at least one method and one sparsity")
    settings = merged_settings(args)
    ev = EvalConfig(data=args.eval_data, seqlen=args.eval_seqlen, max_tokens=args.max_tokens)
    for src in ev.data:
        check_source(src)
    zkw = {"limit": limit_of(args.limit), "num_fewshot": args.num_fewshot, "include_path": args.include_path}
    try:
        table = run_sweep(methods, sparsities, args.output, model_spec=args.model, settings=settings, eval_config=ev,
                          tasks=args.tasks, zeroshot_kw=zkw, save_checkpoints=not args.no_checkpoints,
                          device=args.device)
    except KeyboardInterrupt:
        done = sorted(p.parent.name for p in Path(args.output).glob("*/report.json"))
        print(f"fusegpt: interrupted; the {len(done)} finished cell(s) are kept in {args.output} "
              f"({', '.join(done) or 'none yet'}); run the same command again to continue", file=sys.stderr)
        return 130
    print((Path(args.output) / "sweep.md").read_text())
    if not args.no_plots:
        try:
            from ..report_render import render

            page = render(args.output)
            print(f"plots: {page}")
        except ImportError as e:
            print(f"(no plots: {e})")
    print(f"table: {Path(args.output) / 'sweep.md'}, {Path(args.output) / 'sweep.json'}; {len(table['rows'])} cells")
    return 0


# ---------------------------------------------------------------- bench
def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="parameters, prefill latency, decode tokens/s and peak memory, side by side",
                       description="Each --model is loaded in turn and timed with warm-up and repeats (median and "
                                   "spread). Speed-ups are against the first model, next to the ideal: the ratio of "
                                   "decoder-block parameters.",
                       formatter_class=HelpFormatter)
    b.add_argument("--model", action="append", default=None,
                   help="a model folder / hub id / .gguf, repeatable; 'embedded' = the embedded SmolLM2 "
                        "(default: the embedded model only)")
    b.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    b.add_argument("--batch-sizes", default="1,4", help="comma list")
    b.add_argument("--lengths", default="128,512", help="prompt lengths (tokens), comma list")
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode measurement")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--output", default=None, help="write the JSON results here")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..eval.speed import bench_models, format_table

    specs = [None if m in EMBEDDED_ALIASES else m for m in (args.model or ["embedded"])]
    try:
        batch_sizes, lengths = csv(args.batch_sizes, int), csv(args.lengths, int)
    except ValueError:
        raise UsageError("--batch-sizes and --lengths take comma lists of integers") from None
    if args.repeats < 1 or args.warmup < 0 or args.decode_tokens < 1:
        raise UsageError("--repeats and --decode-tokens must be >= 1, --warmup >= 0")
    if not batch_sizes or not lengths or min(batch_sizes) < 1 or min(lengths) < 1:
        raise UsageError(f"--batch-sizes and --lengths take positive integers, got {args.batch_sizes!r} and "
                         f"{args.lengths!r}")
    res = bench_models(specs, batch_sizes=batch_sizes, lengths=lengths, decode_tokens=args.decode_tokens,
                       warmup=args.warmup, repeats=args.repeats, device=args.device, threads=args.threads)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res) if args.json else format_table(res))
    if not any(m["rows"] for m in res["models"]):
        raise UsageError("nothing was measured: every --lengths value (plus --decode-tokens) exceeds the model's "
                         "context; give shorter lengths")
    return 0


# ---------------------------------------------------------------- report
def add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="render a run's report.json (or a sweep folder) to Markdown with PNG plots",
                       formatter_class=HelpFormatter)
    r.add_argument("run_dir", help="a pruned model folder with report.json, or a sweep folder")
    r.add_argument("--output", default=None, help="Markdown file (default: RUN_DIR/report.md; PNGs beside it)")
    r.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..report_render import render

    page = render(args.run_dir, args.output)
    print(f"wrote {page}")
    return 0


def add_commands(sub) -> None:
    """Register ``sweep``, ``bench`` and ``report`` on the ``fusegpt`` sub-parsers."""
    add_sweep_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
