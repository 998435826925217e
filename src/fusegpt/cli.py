"""Command line: parses arguments into configs and calls the Python API, nothing else.

    fusegpt prune --method mi --sparsity 0.25 --output runs/mi25
    fusegpt eval --model runs/mi25 --data wiki news --json
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import shutil
import sys
from pathlib import Path

from . import api
from .checkpoint import check_output, save_pruned
from .config import METHOD_CONFIGS, ConfigError, EvalConfig, config_for
from .data import DataError, check_source, known_sources
from .loading import ModelLoadError, is_width_pruned, load_model, read_config, resolve_model_path
from .offload import offloader_of
from .utils import count_params

logger = logging.getLogger("fusegpt")

EPILOG = """examples:
  fusegpt prune --method mi --sparsity 0.25 --output runs/mi25      # embedded SmolLM2, wiki calibration
  fusegpt prune --model meta-llama/Llama-2-7b-hf --method sleb --sparsity 0.2 --calib wikitext2 --output out
  fusegpt eval --model runs/mi25 --data wiki news --max-tokens 32768 --json
  fusegpt eval --model runs/mi25 --tasks proxies --limit 100        # offline zero-shot proxies (lm-eval)
  fusegpt sweep --methods shortgpt,sleb,mi --sparsity 0.125,0.25 --output runs/sweep
  fusegpt bench --model embedded --model runs/mi25                  # latency, tokens/s, memory
  fusegpt report runs/mi25                                          # report.md with PNG plots
data sources: wiki, news (embedded), wikitext2, c4, ptb (hub), or a .txt / .jsonl file"""


class UsageError(Exception):
    """Bad input found before any long work; printed as one line, exit code 2."""


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _settings(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UsageError(f"--set expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _split_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.replace("+", ",").split(",") if x.strip()]


def build_configs(args) -> list:
    """One config per ``--method`` step (``a+b`` chains), with the matching ``--sparsity`` values."""
    methods = _split_list(args.method)
    try:
        sparsities = _split_list(args.sparsity, float)
    except ValueError:
        raise UsageError(f"--sparsity must be a number in (0, 1) (or a comma list for chains), got {args.sparsity!r}") from None
    if len(sparsities) != len(methods):
        raise UsageError(f"give one --sparsity per method: {len(methods)} method(s), {len(sparsities)} value(s)")
    extra = _settings(args.set)
    configs = []
    for m, s in zip(methods, sparsities, strict=True):
        if m not in METHOD_CONFIGS:
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(sorted(METHOD_CONFIGS))}")
        kw = dict(sparsity=s, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, calib_source=args.calib)
        if getattr(args, "preset", None):
            kw["preset"] = args.preset
        mfields = METHOD_CONFIGS[m].__dataclass_fields__
        if "state_dir" in mfields and "state_dir" not in extra and getattr(args, "output", None):
            kw["state_dir"] = f"{args.output}.state/{m}"  # per-block run state (FuseGPT, MI+FT)
        if getattr(args, "resume", False) and "resume" in mfields:
            kw["resume"] = True
        own = {k: v for k, v in extra.items() if k in {f for f in METHOD_CONFIGS[m].__dataclass_fields__}}
        configs.append(config_for(m, **kw, **own))
    unused = set(extra) - {f for c in configs for f in c.__dataclass_fields__}
    if unused:
        raise UsageError(f"--set: no method here has setting(s) {', '.join(sorted(unused))}")
    return configs


def _check_model(spec: str | None) -> str:
    path = resolve_model_path(spec)
    if Path(path).exists() and not is_width_pruned(path):
        read_config(path)
    return path


def _fmt(x) -> str:
    return f"{x:,.3f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def print_table(rows: list[tuple], header: tuple) -> None:
    cells = [tuple(_fmt(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_prune(args) -> int:
    configs = build_configs(args)
    out = check_output(args.output, args.overwrite)
    eval_cfg = None if args.no_eval else EvalConfig(data=args.eval_data, seqlen=args.eval_seqlen, max_tokens=args.max_tokens)
    for src in eval_cfg.data if eval_cfg else ():
        check_source(src)
    _check_model(args.model)
    offload = args.offload
    if getattr(args, "max_memory", None):
        offload = _check_memory(args, configs, eval_cfg)
    model, tok = _load(args, offload)
    api._load_method_plugins()
    api.check_plan(model, configs)
    from .data import calibration_windows

    for c in configs:  # tokenizes and checks the calibration text is long enough, before long work
        calibration_windows(tok, c.calib.source, c.calib.nsamples, c.calib.seqlen, c.calib.seed)
    model, report = api.compress(model, tok, configs, model_name=args.model or "embedded:SmolLM2-135M-Instruct",
                                 eval_config=eval_cfg)
    save_pruned(model, tok, out, report, overwrite=args.overwrite)
    _clear_run_state(configs, out)
    off = offloader_of(model)
    if off is not None:
        off.close()  # the edited blocks are in the output now
    rows = [("blocks", report.layers_before, report.layers_after), ("params", report.params_before, report.params_after)]
    for src in (eval_cfg.data if eval_cfg else ()):
        rows.append((f"ppl {src}", report.perplexity["before"][src], report.perplexity["after"][src]))
    print(f"{report.to_dict()['method']}: removed blocks {report.removed} (original indices, removal order); "
          f"{report.wall_time_s:.0f}s, peak {report.peak_memory_mb:.0f} MB")
    print_table(rows, ("", "before", "after"))
    for st in report.steps:  # width steps (SlimGPT, magnitude): what the decoder lost
        if "sparsity_achieved" in st.details:
            dp = st.details["decoder_params"]
            print(f"{st.method}: decoder parameters {dp['before']:,} -> {dp['after']:,} "
                  f"({st.details['sparsity_achieved']:.1%} below the start); per-layer widths in report.json")
    print(f"saved to {out}")
    return 0


def _clear_run_state(configs, out: Path) -> None:
    """Remove the per-block resume state (FuseGPT, MI+FT) once the output is saved."""
    for c in configs:
        if getattr(c, "state_dir", None):
            shutil.rmtree(c.state_dir, ignore_errors=True)
    parent = Path(f"{out}.state")
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def _device_map(spec: str | None):
    if spec is None or spec in ("auto", "balanced", "balanced_low_0", "sequential"):
        return spec
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    raise UsageError(f"--device-map {spec!r}: give auto, balanced, sequential or a .json file of module -> device")


def _load(args, offload: str | None):
    """Load the model as the device flags say (resident, layer-wise, or over several GPUs)."""
    if offload and args.device_map:
        raise UsageError("--offload and --device-map exclude each other: offload runs layer-wise on one device, "
                         "a device map spreads the model over several")
    return load_model(args.model, dtype=_dtype(args), device=args.device, offload=offload,
                      offload_folder=args.offload_folder, device_map=_device_map(args.device_map))


def _dtype(args):
    import torch

    name = getattr(args, "dtype", "auto")
    return None if name == "auto" else getattr(torch, name)


def _check_memory(args, configs, eval_cfg) -> str | None:
    """Honour ``--max-memory``: the offload to use (switching to layer-wise when only that fits) or refuse."""
    from transformers import AutoConfig

    from .memory import parse_size, plan_offload

    path = resolve_model_path(args.model)
    if is_width_pruned(path):
        logger.warning("--max-memory: no estimate for width-pruned inputs; not checked")
        return args.offload
    try:
        return plan_offload(AutoConfig.from_pretrained(path), configs, parse_size(args.max_memory), args.device,
                            eval_cfg, offload=args.offload, dtype=_dtype(args))
    except MemoryError as e:
        raise UsageError(str(e)) from None


def cmd_export(args) -> int:
    from .export import export_gguf

    _check_model(args.model)
    model, tok = load_model(args.model, device="cpu", dtype=None)
    out = export_gguf(model, tok, args.gguf, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({model.config.num_hidden_layers} blocks, {args.dtype})")
    return 0


def cmd_eval(args) -> int:
    data = args.data if args.data is not None else ([] if args.tasks else ["wiki", "news"])
    cfg = EvalConfig(data=data, seqlen=args.seqlen, max_tokens=args.max_tokens, batch_size=args.batch_size) if data else None
    for src in cfg.data if cfg else ():
        check_source(src)
    path = _check_model(args.model)
    if args.tasks and args.offload:
        raise UsageError("--tasks runs lm-eval on the whole model; it cannot use --offload (use --device-map to "
                         "spread a large model over GPUs)")
    model, tok = _load(args, args.offload)
    ctx = getattr(model.config, "max_position_embeddings", None)
    if cfg and ctx and cfg.seqlen > ctx:
        raise UsageError(f"seqlen {cfg.seqlen} exceeds the model's context of {ctx} tokens; lower --seqlen")
    ppl = api.evaluate(model, tok, cfg) if cfg else {}
    result = {"model": args.model or "embedded:SmolLM2-135M-Instruct", "path": path, "ppl": ppl,
              "params": count_params(model), "n_layers": model.config.get_text_config().num_hidden_layers,
              "seqlen": cfg.seqlen if cfg else None, "max_tokens": cfg.max_tokens if cfg else None}
    rows = [(f"ppl {k}", v) for k, v in ppl.items()]
    if args.tasks:
        from .cli_eval import run_zeroshot, zeroshot_rows

        result["zeroshot"] = run_zeroshot(args, model, tok, path)
        rows += zeroshot_rows(result["zeroshot"])
    if args.json:
        print(json.dumps(result))
    else:
        print_table(rows + [("params", result["params"]), ("blocks", result["n_layers"])], ("", "value"))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local folder, hub id (owner/name) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights' dtype: auto = float32 on CPU, bfloat16 on CUDA (Hessians, merges and trained "
                        "parameters are float32 whatever this says)")
    p.add_argument("--offload", choices=("cpu", "disk"), default=None,
                   help="layer-wise execution: keep the decoder blocks in host memory (cpu) or on disk and bring each "
                        "onto --device only while it is used (models larger than device memory)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where --offload disk keeps edited blocks (default: a temporary folder, removed at exit)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread the model over several GPUs with accelerate: auto, balanced, sequential, or a JSON "
                        "file mapping module names to devices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusegpt", description="Structured pruning of decoder LLMs.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the checkpoint with report.json",
                       description="Prune a model, evaluate it before/after, save checkpoint + report.json.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    p.add_argument("--method", required=True,
                   help=f"one of {', '.join(sorted(METHOD_CONFIGS))}; chain with '+' (e.g. fusegpt+slimgpt)")
    p.add_argument("--sparsity", required=True,
                   help="fraction in (0,1): of blocks for depth methods, of decoder parameters for width methods; "
                        "one value per chained method, comma-separated")
    p.add_argument("--calib", default=None, help="calibration source (default: the method's, wiki for block methods)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the method's)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default: the method's)")
    p.add_argument("--seed", type=int, default=None, help="seed for calibration sampling and training (default 0)")
    p.add_argument("--preset", default=None, help="method preset where the method has them (e.g. fusegpt: paper, cpu)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config setting, repeatable")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted fusegpt / mi+ft run from <output>.state/ (same settings)")
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval-data", nargs="+", default=["wiki", "news"], help="perplexity sources before/after")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    p.add_argument("--max-tokens", type=int, default=32768, help="cap on evaluation tokens per source")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse up front when the estimated peak memory exceeds SIZE (e.g. 24GB, 512MiB)")
    p.set_defaults(func=cmd_prune)

    x = sub.add_parser("export", help="write a (block-pruned / fused) LLaMA-family checkpoint as GGUF",
                       description="Export to GGUF (architecture llama) for llama.cpp-based runtimes.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    x.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="type of the 2-D weights (norms stay f32)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval) of a model",
                       description=f"Perplexity, GPTQ protocol. Sources: {known_sources()}. "
                                   "Zero-shot accuracy through lm-evaluation-harness with --tasks.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(e)
    e.add_argument("--data", nargs="+", default=None,
                   help="perplexity sources (default: wiki news, or none when --tasks is given)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length")
    e.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per source")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (perplexity); lm-eval batch size")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    from .cli_eval import add_commands, add_zeroshot_args

    add_zeroshot_args(e)
    e.set_defaults(func=cmd_eval)
    add_commands(sub)  # sweep, bench, report
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet or getattr(args, "json", False) else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError, ModelLoadError, FileExistsError, ValueError) as e:
        print(f"fusegpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusegpt: interrupted; no output was written", file=sys.stderr)
        return 130
