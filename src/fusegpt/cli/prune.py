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
    wants_help,
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
                    "--set help lists every setting of the methods with its bounds and help. "
                    "--dry-run prints every resolved setting with where it came from, the memory and time "
                    "estimates, and stops. --recipe RUN/report.json re-runs a finished run (its explicit "
                    "settings and presets) and says what differs now.",
        formatter_class=RawHelpFormatter)
    add_device_args(p)
    p.add_argument("--method", default=None, help=f"one of {', '.join(registry.names())}, or a chain joined by '+'")
    p.add_argument("--sparsity", default=None,
                   help="fraction in (0,1): of blocks for depth methods, of decoder parameters for width methods; "
                        "one value per chained method, comma-separated")
    t = p.add_argument_group("speed target (instead of --sparsity)")
    t.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="pick the sparsity (for a depth+width chain also the split) whose predicted speed-up in "
                        "--runtime is at least X, from the runtime's cost model (fusegpt bench --calibrate fits it "
                        "once per machine); --dry-run shows the prediction")
    t.add_argument("--runtime", choices=("llamacpp", "torch"), default="llamacpp",
                   help="where the speed-up counts (default llamacpp)")
    t.add_argument("--speed-dtype", default="f16", help="llamacpp: the GGUF type the speed-up is for (default f16)")
    t.add_argument("--speed-test", choices=("both", "pp", "tg"), default="both",
                   help="prompt processing (pp512), generation (tg128), or both (default)")
    t.add_argument("--speed-threads", type=int, default=1, help="threads of the cost model (default 1)")
    t.add_argument("--speed-candidates", type=int, default=3,
                   help="depth+width chains: splits pruned and compared by calibration loss (default 3)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="re-run a recipe: a run's report.json or a recipe .yaml (fusegpt recipe writes one); "
                        "instead of --method/--sparsity; flags given as well override the recipe")
    add_settings_args(p, "any other setting of a method in the chain, repeatable; --set help lists them")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings with their origin, the memory and time estimates; load nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <output>.state/ (same settings)")
    p.add_argument("--restart", action="store_true",
                   help="discard the run state an interrupted run left in <output>.state/ and start again")
    p.add_argument("--output", default=None, help="output folder (written atomically; required but with --set help)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (only one fusegpt wrote, with nothing added)")
    add_before_after_eval_args(p)
    p.add_argument("--heal", action="store_true",
                   help="after pruning, recovery training (LoRA, merged back; extra: heal); see fusegpt heal")
    p.add_argument("--heal-set", action="append", metavar="KEY=VALUE",
                   help="a healing setting (loss, nsamples, seqlen, epochs, lr, ...), repeatable; --heal-set help "
                        "lists them")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse up front when the estimated peak memory exceeds SIZE (e.g. 24GB, 512MiB); switches "
                        "to layer-wise execution when only that fits")
    p.set_defaults(func=cmd_prune)


def resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a != "--restart"]
    if "--resume" not in args:
        args.append("--resume")
    return "fusegpt " + shlex.join(args)


def _settings_help(names: list[str], heal: bool = False) -> str:
    from ..settings import describe_settings

    parts = [f"{n} settings (--set KEY=VALUE):\n{describe_settings(registry.get(n).config_cls)}" for n in names]
    if heal:
        parts.append(f"healing settings (--heal-set KEY=VALUE):\n{describe_settings(HealConfig)}")
    return "\n\n".join(parts)


def _chain(args):
    """(configs, recipe or None, heal config or None) from the flags, or from ``--recipe`` with the flags on top."""
    from ..methods import parse_chain
    from ..methods.recipe import Recipe

    settings = merged_settings(args)
    heal_over = settings_from(args.heal_set, "--heal-set")
    if args.recipe is None:
        if args.method is None or (args.sparsity is None) == (args.target_speedup is None):
            raise UsageError("give --method and either --sparsity or --target-speedup (or --recipe RUN/report.json)")
        sparsity = args.sparsity if args.target_speedup is None else \
            ",".join("0.5" for _ in parse_chain(args.method))  # replaced by the speed target's choice
        configs = configs_for(args.method, sparsity, **settings)
        heal = HealConfig().with_overrides(**heal_over) if args.heal else None
        return configs, None, heal
    if args.method is not None or args.sparsity is not None or args.target_speedup is not None:
        raise UsageError("--recipe gives the methods and sparsities; drop --method/--sparsity/--target-speedup (use "
                         "--set to change a setting)")
    recipe = Recipe.load(args.recipe)
    names = [c.method for c in recipe.steps]
    used: set[str] = set()
    configs = []
    for c in recipe.steps:
        own = {k: v for k, v in settings.items() if k in c.setting_names()}
        used |= set(own)
        configs.append(c.with_overrides(**own))
    unused = set(settings) - used
    if unused:
        raise UsageError(f"no method in the recipe ({'+'.join(names)}) has setting(s) {', '.join(sorted(unused))}")
    parse_chain("+".join(names))
    heal = recipe.heal
    if args.heal or heal_over:
        heal = (heal or HealConfig()).with_overrides(**heal_over)
    return configs, recipe, heal


def cmd_prune(args) -> int:
    from ..methods import parse_chain
    from ..report import library_versions

    if wants_help(args.set) or wants_help(args.heal_set):
        if args.method is None and args.recipe is None:
            raise UsageError("--set help needs --method (the settings listed are that method's)")
        names = parse_chain(args.method) if args.method else [c.method for c in _recipe_steps(args.recipe)]
        print(_settings_help(names, heal=wants_help(args.heal_set) or args.heal))
        return 0
    if args.output is None:
        raise UsageError("give --output: the folder the pruned model is saved to")
    configs, recipe, heal = _chain(args)
    eval_cfg = eval_config_of(args, recipe.eval if recipe else None)
    model = args.model if args.model is not None or recipe is None else recipe.model
    check_model(model)
    placement = placement_of(args)
    if recipe is not None:
        import torch

        from ..api import resolve_configs

        kind = torch.device(placement.device).type
        diffs = recipe.differences(resolve_configs(configs, kind), library_versions(), placement.device,
                                   heal.resolve(kind) if heal is not None else None)
        if args.model is not None and args.model != recipe.model:
            diffs.insert(0, f"model: {recipe.model or 'embedded'} in the recipe, {args.model} now")
        print(f"recipe {recipe.source}: {'+'.join(c.method for c in configs)}"
              + ("; differences from the recorded run:\n  " + "\n  ".join(diffs) if diffs else
                 "; same settings, versions and device as the recorded run"), file=sys.stderr)
    target = None
    if args.target_speedup is not None:
        from ..methods.target import SpeedTarget

        target = SpeedTarget(args.target_speedup, args.runtime, args.speed_dtype, args.speed_test, args.speed_threads,
                             args.speed_candidates)
    try:
        res = prune(model, configs, args.output, placement=placement, eval_config=eval_cfg,
                    overwrite=args.overwrite, resume=args.resume, restart=args.restart, dry_run=args.dry_run,
                    model_name=model or "embedded:SmolLM2-135M-Instruct", heal=heal, target=target)
    except Interrupted as e:
        print(f"fusegpt: {interrupted_message(e, resume_command(args.argv) if e.state else None)}", file=sys.stderr)
        return 143 if e.signal == "SIGTERM" else 130
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
    rows += [(r[0], "–", *r[1:])  # the dense model is its own teacher: no "before" column
             for r in fidelity_rows(report, ("after", "healed") if healed else ("after",), eval_cfg)]
    print(f"{report.method}: removed blocks {report.removed} (original indices, removal order); "
          f"{report.wall_time_s:.0f}s (estimated {res.plan.total_seconds:.0f}s), peak {report.peak_memory_mb:.0f} MB"
          + (" (resumed; the time includes the interrupted runs)" if report.resumed else ""))
    print_table(rows, ("", "before", "after") + (("healed",) if healed else ()))
    if report.heal is not None:
        h = report.heal
        print(f"healing ({h.loss}, {h.trained}): training loss {h.loss_before:.4f} -> {h.loss_after:.4f} in "
              f"{h.steps} steps, {h.wall_time_s:.0f}s")
    for st in report.steps:  # width steps: what the decoder lost
        if "sparsity_achieved" in st.details:
            dp = st.details["decoder_params"]
            print(f"{st.method}: decoder parameters {dp['before']:,} -> {dp['after']:,} "
                  f"({st.details['sparsity_achieved']:.1%} below the start); per-layer widths in report.json")
    print(f"saved to {res.output}")
    return 0


def fidelity_rows(report, stages: tuple[str, ...], eval_cfg) -> list[tuple]:
    """Table rows of the fidelity metrics (first source) for the report's ``stages`` that have them."""
    if eval_cfg is None or not report.fidelity:
        return []
    src = eval_cfg.data[0]
    rows = []
    for key, label in (("kl", "KL to teacher"), ("top1", "top-1 agreement"), ("gen_match_mean", "gen. match (mean)")):
        vals = [report.fidelity.get(s, {}).get(src, {}).get(key) for s in stages]
        if any(v is not None for v in vals):
            rows.append((f"{label} {src}", *[v if v is not None else "–" for v in vals]))
    return rows


def _recipe_steps(path: str):
    from ..methods.recipe import Recipe

    return Recipe.load(path).steps


def add_heal_parser(sub) -> None:
    h = sub.add_parser("heal", help="recovery training of a pruned checkpoint (LoRA, merged back)",
                       description="LoRA on the next-token loss of the whole model (peft, extra 'heal'), merged into "
                                   "the weights: a depth-pruned folder stays a stock checkpoint, a width-pruned one a "
                                   "load_pruned checkpoint. Perplexity before/after goes into report.json. "
                                   "--set help lists the settings.",
                       formatter_class=HelpFormatter)
    add_device_args(h)
    h.add_argument("--output", required=True, help="output folder (written atomically)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only one fusegpt "
                                                             "wrote)")
    h.add_argument("--preset", default=None, choices=PRESETS, help="healing preset (default: paper on CUDA, cpu otherwise)")
    h.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a healing setting, repeatable; --set help lists them (loss=kd distils from the teacher)")
    h.add_argument("--teacher", default=None, metavar="DENSE",
                   help="the dense model to distil from (loss=kd, kd+lm) and to measure --fidelity against; "
                        "'embedded' = the embedded SmolLM2; default: the source model named in the folder's report.json")
    add_before_after_eval_args(h)
    h.set_defaults(func=cmd_heal)


def cmd_heal(args) -> int:
    if wants_help(args.set):
        print(_settings_help([], heal=True))
        return 0
    if args.model is None:
        raise UsageError("give --model: the pruned checkpoint folder to heal")
    cfg = HealConfig(preset=args.preset).with_overrides(**settings_from(args.set))
    eval_cfg = eval_config_of(args)
    check_model(args.model)
    report = heal_checkpoint(args.model, args.output, cfg, eval_config=eval_cfg, overwrite=args.overwrite,
                             placement=placement_of(args), teacher=args.teacher)
    h = report.heal
    assert h is not None
    rows = [(f"ppl {src}", report.perplexity["after"][src], report.perplexity["healed"][src])
            for src in (eval_cfg.data if eval_cfg else ())]
    rows += fidelity_rows(report, ("after", "healed"), eval_cfg)
    rows.append(("training loss (LM)", h.loss_before, h.loss_after))
    if h.kd_before is not None:
        rows.append(("training loss (KD)", h.kd_before, h.kd_after))
    print_table(rows, ("", "before", "after"))
    print(f"healed ({h.loss}, {h.trained}) in {h.wall_time_s:.0f}s ({h.steps} steps); saved to {args.output}")
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
                   help="type of the 2-D weights: float, a 32-wide block quantisation (q8_0 is near-lossless), or a "
                   "k-quant (q4_k_m, q5_k_m, q6_k: llama.cpp's own quantiser, needs llama-cpp-python); norms stay f32")
    x.add_argument("--pre", default=None, metavar="NAME",
                   help="force tokenizer.ggml.pre (a pre-tokenizer name llama.cpp knows, e.g. smollm, llama-bpe, "
                   "qwen2, gpt-2); default: carried over from a GGUF source, else derived as llama.cpp's converter "
                   "does")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file (only a GGUF fusegpt wrote)")
    x.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..checkpoint.gguf import check_dtype, check_gguf_output, export_gguf, gguf_arch

    check_dtype(args.dtype)
    path = check_model(args.model)
    inputs = [path] + ([args.model] if args.model and Path(args.model).expanduser().exists() else [])
    check_gguf_output(args.gguf, args.overwrite, inputs)  # before the model is loaded
    model, tok = load_model(args.model, device="cpu", dtype=None)
    out = export_gguf(model, tok, args.gguf, dtype=args.dtype, overwrite=args.overwrite, pre=args.pre, inputs=inputs)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({gguf_arch(model)}, {model.config.num_hidden_layers} blocks, {args.dtype}, {size:.1f} MiB)")
    return 0
