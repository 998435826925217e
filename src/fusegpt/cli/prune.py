"""``fusegpt prune`` and ``fusegpt export``: parse, then call :func:`fusegpt.prune` / the GGUF writer."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..api import configs_for, heal_checkpoint, interrupted_message, prune
from ..heal import HealConfig
from ..loading import load_model
from ..methods import registry
from ..runstate import Interrupted
from ..settings import PRESETS
from .common import (
    HelpFormatter,
    RawHelpFormatter,
    UsageError,
    add_before_after_eval_args,
    add_device_args,
    add_settings_args,
    check_model,
    eval_config_of,
    merged_settings,
    placement_of,
    print_table,
    settings_from,
)


def _methods_help() -> str:
    return "\n".join(f"  {m:<10} {registry.get(m).summary}" for m in registry.names())


def add_prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a model and save the checkpoint with report.json",
        description="Prune a model, evaluate it before/after, save checkpoint + report.json (atomically).\n\n"
                    f"methods:\n{_methods_help()}\n\n"
                    "Chain methods with '+', one --sparsity each: --method mi+slimgpt --sparsity 0.125,0.2 "
                    "(registered names match first, longest first: mi+ft is MI+FT, mi+ft+slimgpt is MI+FT then "
                    "SlimGPT).\nSettings left unset come from the preset: 'paper' on CUDA, 'cpu' otherwise (sized "
                    "to finish on the embedded model in minutes on a CPU); an explicit value always wins. "
                    "--dry-run prints every resolved setting with where it came from, the memory and time "
                    "estimates, and stops.",
        formatter_class=RawHelpFormatter)
    add_device_args(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(registry.names())}, or a chain joined by '+'")
    p.add_argument("--sparsity", required=True,
                   help="fraction in (0,1): of blocks for depth methods, of decoder parameters for width methods; "
                        "one value per chained method, comma-separated")
    add_settings_args(p, "any other setting of a method in the chain, repeatable (see --dry-run for the names)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings with their origin, the memory and time estimates; load nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <output>.state/ (same settings)")
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_before_after_eval_args(p)
    p.add_argument("--heal", action="store_true",
                   help="after pruning, recovery fine-tuning: LoRA on the next-token loss, merged back (extra: heal)")
    p.add_argument("--heal-set", action="append", metavar="KEY=VALUE",
                   help="a healing setting (nsamples, seqlen, epochs, lr, lora_rank, source, ...), repeatable")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse up front when the estimated peak memory exceeds SIZE (e.g. 24GB, 512MiB); switches "
                        "to layer-wise execution when only that fits")
    p.set_defaults(func=cmd_prune)


def resume_command(argv: list[str]) -> str:
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return "fusegpt " + shlex.join(args)


def cmd_prune(args) -> int:
    configs = configs_for(args.method, args.sparsity, **merged_settings(args))
    eval_cfg = eval_config_of(args)
    check_model(args.model)
    try:
        res = prune(args.model, configs, args.output, placement=placement_of(args), eval_config=eval_cfg,
                    overwrite=args.overwrite, resume=args.resume, dry_run=args.dry_run,
                    model_name=args.model or "embedded:SmolLM2-135M-Instruct",
                    heal=HealConfig().with_overrides(**settings_from(args.heal_set)) if args.heal else None)
    except Interrupted as e:
        print(f"fusegpt: {interrupted_message(e, resume_command(args.argv) if e.state else None)}", file=sys.stderr)
        return 130
    if args.dry_run:
        print(res.plan.describe())
        print("dry run: nothing was loaded or written")
        return 0
    report = res.report
    rows = [("blocks", report.layers_before, report.layers_after), ("params", report.params_before, report.params_after)]
    healed = report.perplexity.get("healed")
    if healed:  # the healed model has the pruned shape
        rows = [r + (r[2],) for r in rows]
    for src in (eval_cfg.data if eval_cfg else ()):
        rows.append((f"ppl {src}", report.perplexity["before"][src], report.perplexity["after"][src])
                    + ((healed[src],) if healed else ()))
    print(f"{report.to_dict()['method']}: removed blocks {report.removed} (original indices, removal order); "
          f"{report.wall_time_s:.0f}s (estimated {res.plan.total_seconds:.0f}s), peak {report.peak_memory_mb:.0f} MB")
    print_table(rows, ("", "before", "after") + (("healed",) if healed else ()))
    if healed:
        h = report.extra["heal"]
        print(f"healing: training loss {h['loss_before']:.4f} -> {h['loss_after']:.4f} in {h['steps']} steps, "
              f"{h['wall_time_s']:.0f}s")
    for st in report.steps:  # width steps: what the decoder lost
        if "sparsity_achieved" in st.details:
            dp = st.details["decoder_params"]
            print(f"{st.method}: decoder parameters {dp['before']:,} -> {dp['after']:,} "
                  f"({st.details['sparsity_achieved']:.1%} below the start); per-layer widths in report.json")
    print(f"saved to {res.output}")
    return 0


def add_heal_parser(sub) -> None:
    h = sub.add_parser("heal", help="recovery fine-tuning of a pruned checkpoint (LoRA, merged back)",
                       description="LoRA on the next-token loss of the whole model (peft, extra 'heal'), merged into "
                                   "the weights: a depth-pruned folder stays a stock checkpoint, a width-pruned one a "
                                   "load_pruned checkpoint. Perplexity before/after goes into report.json.",
                       formatter_class=HelpFormatter)
    add_device_args(h)
    h.add_argument("--output", required=True, help="output folder (written atomically)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    h.add_argument("--preset", default=None, choices=PRESETS, help="healing preset (default: paper on CUDA, cpu otherwise)")
    h.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a healing setting: source, nsamples, seqlen, epochs, batch_size, lr, lora_rank, lora_alpha")
    add_before_after_eval_args(h)
    h.set_defaults(func=cmd_heal)


def cmd_heal(args) -> int:
    if args.model is None:
        raise UsageError("give --model: the pruned checkpoint folder to heal")
    cfg = HealConfig(preset=args.preset).with_overrides(**settings_from(args.set))
    eval_cfg = eval_config_of(args)
    check_model(args.model)
    report = heal_checkpoint(args.model, args.output, cfg, eval_config=eval_cfg, overwrite=args.overwrite,
                             placement=placement_of(args))
    h = report.extra["heal"]
    rows = [(f"ppl {src}", report.perplexity["before_heal"][src], report.perplexity["after_heal"][src])
            for src in (eval_cfg.data if eval_cfg else ())]
    rows.append(("training loss", h["loss_before"], h["loss_after"]))
    print_table(rows, ("", "before", "after"))
    print(f"healed in {h['wall_time_s']:.0f}s ({h['steps']} steps); saved to {args.output}")
    return 0


def add_export_parser(sub) -> None:
    from ..checkpoint.gguf.quant import DTYPES

    x = sub.add_parser("export", help="write a pruned LLaMA-family / Qwen2 checkpoint as GGUF for llama.cpp",
                       description="Export to GGUF for llama.cpp and its front ends (Ollama, LM Studio, "
                       "llama-cpp-python). Depth-pruned models (ShortGPT, SLEB, MI, FuseGPT) are written as "
                       "architecture 'llama' (or 'qwen2'); width-pruned ones (SlimGPT) as 'deci', which llama.cpp "
                       "builds at per-layer widths (stock transformers cannot read 'deci').",
                       formatter_class=HelpFormatter)
    x.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    x.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="type of the 2-D weights: float, or a 32-wide block quantisation (q8_0 is near-lossless); "
                   "norms stay f32; for k-quants export f16 and run llama.cpp's llama-quantize")
    x.add_argument("--pre", default=None, metavar="NAME",
                   help="force tokenizer.ggml.pre (a pre-tokenizer name llama.cpp knows, e.g. smollm, llama-bpe, "
                   "qwen2, gpt-2); default: carried over from a GGUF source, else derived as llama.cpp's converter "
                   "does")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..checkpoint.atomic import check_writable
    from ..checkpoint.gguf import export_gguf, gguf_arch

    out = Path(args.gguf).expanduser()
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise UsageError(f"{out} exists and is not a file; choose another --gguf")
    check_writable(out.parent)
    check_model(args.model)
    model, tok = load_model(args.model, device="cpu", dtype=None)
    out = export_gguf(model, tok, args.gguf, dtype=args.dtype, overwrite=args.overwrite, pre=args.pre)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({gguf_arch(model)}, {model.config.num_hidden_layers} blocks, {args.dtype}, {size:.1f} MiB)")
    return 0
