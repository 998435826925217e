"""``fusegpt eval``: perplexity and zero-shot accuracy (lm-evaluation-harness) of a model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..api import evaluate
from ..data import check_source, known_sources
from ..settings import EvalConfig
from ..utils import count_params
from .common import (
    HelpFormatter,
    UsageError,
    add_device_args,
    check_model,
    load,
    print_table,
)

logger = logging.getLogger(__name__)


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval) of a model",
                       description=f"Perplexity, GPTQ protocol. Sources: {known_sources()}. "
                                   "Zero-shot accuracy through lm-evaluation-harness with --tasks.",
                       formatter_class=HelpFormatter)
    add_device_args(e)
    e.add_argument("--data", nargs="+", default=None,
                   help="perplexity sources (default: wiki news, or none when --tasks is given)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length")
    e.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per source")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (perplexity); lm-eval batch size")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--teacher", default=None, metavar="DENSE",
                   help="also measure fidelity to this dense model on the --data text: KL(teacher || model), top-1 "
                        "agreement, and how many greedy tokens match before the first difference ('embedded' = "
                        "the embedded SmolLM2)")
    e.add_argument("--prompts", type=int, default=16, help="--teacher: generation prompts")
    e.add_argument("--gen-len", type=int, default=32, help="--teacher: tokens generated per prompt")
    add_zeroshot_args(e)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    data = args.data if args.data is not None else ([] if args.tasks else ["wiki", "news"])
    cfg = EvalConfig(data=data, seqlen=args.seqlen, max_tokens=args.max_tokens, batch_size=args.batch_size,
                     fidelity=args.teacher is not None, prompts=args.prompts, gen_len=args.gen_len) if data else None
    for src in cfg.data if cfg else ():
        check_source(src)
    path = check_model(args.model, need_adapter=args.offload is not None)  # perplexity needs no adapter
    teacher_spec = None if args.teacher in (None, "embedded") else args.teacher
    if args.teacher is not None:
        if not cfg:
            raise UsageError("--teacher measures fidelity on the --data text; give --data")
        if args.offload:
            raise UsageError("--teacher keeps the dense model beside this one; it cannot use --offload")
        check_model(teacher_spec, need_adapter=False)
    if args.tasks and args.offload:
        raise UsageError("--tasks runs lm-eval on the whole model; it cannot use --offload (use --device-map to "
                         "spread a large model over GPUs)")
    model, tok = load(args, args.offload, need_adapter=args.offload is not None)
    ctx = getattr(model.config, "max_position_embeddings", None)
    if cfg and ctx and cfg.seqlen > ctx:
        raise UsageError(f"seqlen {cfg.seqlen} exceeds the model's context of {ctx} tokens; lower --seqlen")
    ppl = evaluate(model, tok, cfg) if cfg else {}
    result = {"model": args.model or "embedded:SmolLM2-135M-Instruct", "path": path, "ppl": ppl,
              "params": count_params(model), "n_layers": model.config.get_text_config().num_hidden_layers,
              "seqlen": cfg.seqlen if cfg else None, "max_tokens": cfg.max_tokens if cfg else None}
    rows = [(f"ppl {k}", v) for k, v in ppl.items()]
    if args.teacher is not None:
        from ..api import evaluate_fidelity
        from ..loading import load_model

        teacher, _ = load_model(teacher_spec, device=args.device, need_adapter=False)
        if teacher.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
            raise UsageError(f"the teacher's vocabulary ({teacher.config.get_text_config().vocab_size}) is not the "
                             f"model's ({model.config.get_text_config().vocab_size}); give the model it was pruned from")
        result["fidelity"] = {**evaluate_fidelity(model, teacher, tok, cfg), "teacher": args.teacher}
        for src in cfg.data:
            f = result["fidelity"][src]
            rows += [(f"KL to teacher {src}", f["kl"]), (f"top-1 agreement {src}", f["top1"]),
                     (f"gen. match mean / median {src}", f"{f['gen_match_mean']:.1f} / {f['gen_match_median']:.1f}"
                      if f["gen_match_mean"] is not None else "–")]
    if args.tasks:
        result["zeroshot"] = run_zeroshot(args, model, tok)
        rows += zeroshot_rows(result["zeroshot"])
    if args.json:
        print(json.dumps(result))
    else:
        print_table(rows + [("params", result["params"]), ("blocks", result["n_layers"])], ("", "value"))
    if args.tasks and not args.no_update_report:  # results are printed first: a read-only folder costs nothing
        try:
            update_report(path, result["zeroshot"])
        except OSError as e:  # a read-only folder, or a report.json fusegpt did not write (OutputExistsError)
            logger.warning("could not add the zero-shot results to %s/report.json (%s); they are printed above",
                           path, e.strerror or e)
    return 0


# ---------------------------------------------------------------- eval --tasks
def add_zeroshot_args(e: argparse.ArgumentParser) -> None:
    g = e.add_argument_group("zero-shot (lm-evaluation-harness, extra 'eval')")
    g.add_argument("--tasks", default=None,
                   help="comma list of lm-eval tasks, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge; "
                        "aliases: paper, slimgpt (+boolq,openbookqa), proxies (offline: wiki_lastword_proxy,"
                        "news_continuation_proxy). With --tasks and no --data, perplexity is skipped")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    g.add_argument("--limit", type=float, default=None,
                   help="examples per task (an int, or a fraction < 1); results with a limit do not compare "
                        "with published numbers")
    g.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="folder of local lm-eval task YAMLs (repeatable)")
    g.add_argument("--no-update-report", action="store_true",
                   help="do not add the zero-shot results to the model folder's report.json")


def limit_of(x: float | None) -> int | float | None:
    """``--limit``: examples per task (an integer >= 1) or a fraction in (0, 1)."""
    if x is None:
        return None
    if not x > 0 or (x >= 1 and x != int(x)):
        raise UsageError(f"--limit takes a number of examples per task (an integer >= 1) or a fraction in (0, 1), "
                         f"got {x:g}")
    return int(x) if x >= 1 else x


def run_zeroshot(args, model, tok) -> dict[str, Any]:
    """Zero-shot results for ``fusegpt eval --tasks``."""
    from ..eval.zeroshot import zeroshot

    return zeroshot(model, tok, args.tasks, num_fewshot=args.num_fewshot, limit=limit_of(args.limit),
                    batch_size=args.batch_size, include_path=args.include_path)


def update_report(path: str, res: dict[str, Any]) -> None:
    """Add zero-shot results to ``path/report.json`` when there is one fusegpt wrote (atomic replace, recorded
    in the folder's marker so the folder stays replaceable); a report.json fusegpt cannot prove it wrote
    is left alone (OutputExistsError, which the caller turns into a warning)."""
    from ..checkpoint.ownership import OwnedFolder

    rep = Path(path) / "report.json"
    if not rep.is_file():
        return
    folder = OwnedFolder(path, "output")
    folder.check(["report.json"])
    d = json.loads(rep.read_text())
    d.setdefault("extra", {}).setdefault("zeroshot", {})
    d["extra"]["zeroshot"] = {**(d["extra"]["zeroshot"] or {}), **{t: {**r, "settings": _zs_settings(res)}
                                                                 for t, r in res["tasks"].items()}}
    folder.write_text("report.json", json.dumps(d, indent=2) + "\n")


def _zs_settings(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res[k] for k in ("num_fewshot", "limit", "lm_eval_version")}


def zeroshot_rows(res: dict[str, Any]) -> list[tuple]:
    rows = []
    for t, r in res["tasks"].items():
        for m in ("acc", "acc_norm", "perplexity"):
            if r.get(m) is not None:
                err = r.get(f"{m}_stderr")
                rows.append((f"{t} {m}", f"{r[m]:.4f}" + (f" ± {err:.4f}" if err is not None else "")))
    for m, v in res["average"].items():
        if v is not None:
            rows.append((f"average {m}", f"{v:.4f}"))
    rows.append(("lm-eval", res["lm_eval_version"]))
    return rows
