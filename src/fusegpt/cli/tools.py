"""``fusegpt sweep``, ``bench`` and ``report``: parse, then call the Python API
(:mod:`fusegpt.sweep`, :mod:`fusegpt.eval.speed`, :mod:`fusegpt.report_render`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint.ownership import FILE_KEY, check_file_output, file_record, write_json_file
from ..data import check_source
from ..settings import EvalConfig
from .common import (
    EMBEDDED_ALIASES,
    HelpFormatter,
    UsageError,
    add_settings_args,
    check_model,
    csv,
    merged_settings,
)
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
    s.add_argument("--fidelity", action="store_true",
                   help="also each cell's fidelity to the dense model: KL, top-1 agreement, greedy generation match")
    s.add_argument("--tasks", default=None, help="also zero-shot tasks per cell (see fusegpt eval --tasks)")
    s.add_argument("--limit", type=float, default=None, help="zero-shot examples per task")
    s.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per zero-shot task (default: the task's)")
    s.add_argument("--include-path", action="append", default=None, metavar="DIR", help="local lm-eval task YAMLs")
    s.add_argument("--no-checkpoints", action="store_true", help="keep only each cell's report.json, not its weights")
    s.add_argument("--no-plots", action="store_true", help="skip rendering the sweep's plots (needs matplotlib)")
    s.add_argument("--speed", action="append", default=[], metavar="RUNTIME[:TYPES]",
                   help="time every cell against dense in a runtime: llamacpp:f16,q8_0,q4_k_m or torch (repeatable); "
                        "adds a quality-vs-speed table with the Pareto front")
    s.add_argument("--speed-rounds", type=int, default=3, help="alternating rounds of --speed")
    s.add_argument("--speed-threads", type=int, default=1, help="threads of --speed")
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
    ev = EvalConfig(data=args.eval_data, seqlen=args.eval_seqlen, max_tokens=args.max_tokens, fidelity=args.fidelity)
    for src in ev.data:
        check_source(src)
    zkw = {"limit": limit_of(args.limit), "num_fewshot": args.num_fewshot, "include_path": args.include_path}
    try:
        table = run_sweep(methods, sparsities, args.output, model_spec=args.model, settings=settings, eval_config=ev,
                          tasks=args.tasks, zeroshot_kw=zkw, save_checkpoints=not args.no_checkpoints,
                          device=args.device, speed=args.speed, speed_rounds=args.speed_rounds,
                          speed_threads=args.speed_threads)
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
    b = sub.add_parser("bench", help="speed side by side: PyTorch (prefill, decode) or llama.cpp (pp512, tg128)",
                       description="Times every --model in the chosen runtime. torch: prefill latency, decode tokens/s "
                                   "and peak memory (warm-up, repeats; --rounds N measures all models in alternating "
                                   "rounds). llamacpp: each model exported to GGUF at every --dtypes type and timed as "
                                   "llama-bench does (pp512 = one 512-token prompt, tg128 = 128 tokens one at a time), "
                                   "all files in alternating rounds. Speed-ups are against the first model, next to "
                                   "the ideal: the ratio of decoder-block parameters. --calibrate fits the cost model "
                                   "--target-speedup uses.",
                       formatter_class=HelpFormatter)
    b.add_argument("--model", action="append", default=None,
                   help="a model folder / hub id / .gguf, repeatable; 'embedded' = the embedded SmolLM2 "
                        "(default: the embedded model only)")
    b.add_argument("--runtime", choices=("torch", "llamacpp"), default="torch",
                   help="torch (this PyTorch) or llamacpp (llama.cpp through llama-cpp-python)")
    b.add_argument("--dtypes", default="f16", help="llamacpp: GGUF types, comma list (f16, q8_0, q4_k_m, ...)")
    b.add_argument("--rounds", type=int, default=None, help="alternating rounds over the models (default: 3 for "
                                                            "llamacpp, 1 for torch)")
    b.add_argument("--prompt-tokens", type=int, default=512, help="llamacpp and --calibrate: the pp test's prompt")
    b.add_argument("--gen-tokens", type=int, default=128, help="llamacpp and --calibrate: the tg test's tokens")
    b.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    b.add_argument("--batch-sizes", default="1,4", help="torch: comma list")
    b.add_argument("--lengths", default="128,512", help="torch: prompt lengths (tokens), comma list")
    b.add_argument("--decode-tokens", type=int, default=32, help="torch: tokens generated per decode measurement")
    b.add_argument("--warmup", type=int, default=1, help="torch: untimed runs before each measurement")
    b.add_argument("--repeats", type=int, default=5, help="torch: timed runs per measurement and round")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 for llamacpp)")
    b.add_argument("--calibrate", action="store_true",
                   help="fit this machine's cost model for the first --model's architecture in --runtime (timings of "
                        "random models of the pruned shapes; kept in the cache) instead of timing the models")
    b.add_argument("--output", default=None, help="write the JSON results here (after the table is printed)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output (only a bench JSON fusegpt "
                                                             "wrote)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..bench import bench_llamacpp, check_runtime, format_llamacpp
    from ..eval.speed import bench_models, format_table

    specs = [None if m in EMBEDDED_ALIASES else m for m in (args.model or ["embedded"])]
    try:
        batch_sizes, lengths = csv(args.batch_sizes, int), csv(args.lengths, int)
    except ValueError:
        raise UsageError("--batch-sizes and --lengths take comma lists of integers") from None
    if args.repeats < 1 or args.warmup < 0 or args.decode_tokens < 1 or (args.rounds is not None and args.rounds < 1) \
            or args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise UsageError("--repeats, --rounds, --decode-tokens, --prompt-tokens and --gen-tokens must be >= 1, "
                         "--warmup >= 0")
    if not batch_sizes or not lengths or min(batch_sizes) < 1 or min(lengths) < 1:
        raise UsageError(f"--batch-sizes and --lengths take positive integers, got {args.batch_sizes!r} and "
                         f"{args.lengths!r}")
    dtypes = csv(args.dtypes)
    check_runtime(args.runtime, dtypes)
    for spec in specs:
        check_model(spec, need_adapter=True)
    out = check_file_output(args.output, args.overwrite, what="--output") if args.output else None  # before the work
    if args.calibrate:
        from ..bench import calibrate

        res = calibrate(specs[0], args.runtime, dtype=dtypes[0], threads=args.threads or 1,
                        rounds=args.rounds or 2, device=args.device, n_prompt=args.prompt_tokens, n_gen=args.gen_tokens)
        print(json.dumps(res.to_dict()) if args.json else res.describe())
    elif args.runtime == "llamacpp":
        res = bench_llamacpp(specs, dtypes, rounds=args.rounds or 3, threads=args.threads or 1,
                             n_prompt=args.prompt_tokens, n_gen=args.gen_tokens,
                             names=[m for m in (args.model or ["embedded"])])
        print(json.dumps(res) if args.json else format_llamacpp(res))
        res = {**res}
    else:
        res = bench_models(specs, batch_sizes=batch_sizes, lengths=lengths, decode_tokens=args.decode_tokens,
                           warmup=args.warmup, repeats=args.repeats, device=args.device, threads=args.threads,
                           rounds=args.rounds or 1)
        print(json.dumps(res) if args.json else format_table(res))  # printed first: a failed write loses nothing
        if not any(m["rows"] for m in res["models"]):
            raise UsageError("nothing was measured: every --lengths value (plus --decode-tokens) exceeds the model's "
                             "context; give shorter lengths")
    if out is not None:
        write_json_file(out, {FILE_KEY: file_record("bench"), **(res if isinstance(res, dict) else res.to_dict())})
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


# ---------------------------------------------------------------- recipe
def add_recipe_parser(sub) -> None:
    r = sub.add_parser("recipe", help="write a run's recipe (its explicit settings and presets) as YAML",
                       description="Read a run's report.json (or a recipe file) and print, or write with --output, the "
                                   "recipe that fusegpt prune --recipe re-runs: per step the method, sparsity, preset "
                                   "and explicit settings; healing; the evaluation protocol; the model.",
                       formatter_class=HelpFormatter)
    r.add_argument("source", help="a run folder, its report.json, or a recipe .yaml/.json")
    r.add_argument("--output", default=None, help="write the YAML here instead of printing it")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    r.set_defaults(func=cmd_recipe)


def cmd_recipe(args) -> int:
    from ..checkpoint.ownership import check_file_output
    from ..methods.recipe import Recipe

    src = Path(args.source)
    recipe = Recipe.load(src / "report.json" if src.is_dir() else src)
    text = recipe.to_yaml()
    if args.output is None:
        print(text, end="")
        return 0
    out = check_file_output(args.output, args.overwrite, proven=_is_recipe(Path(args.output)), what="--output")
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def _is_recipe(path: Path) -> bool:
    try:
        return path.is_file() and path.read_text().startswith("fusegpt_recipe:")
    except (OSError, UnicodeDecodeError):
        return False
