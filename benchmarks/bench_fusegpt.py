"""FuseGPT against the block-pruning baselines on the embedded model (the paper's Table II/IV, here).

For each ``--sparsity``: dense, ShortGPT, SLEB, MI, MI+FT and FuseGPT on SmolLM2-135M-Instruct
(30 blocks), one seed, the same seeded calibration windows for every ranking (the ``--preset``'s
MI set, ``wiki`` train), FuseGPT and MI+FT on the preset's fine-tuning windows. Reports perplexity
on the ``wiki`` test split and on ``news`` (GPTQ protocol, ``--eval-seqlen`` windows, first
``--max-tokens`` tokens), blocks removed, wall time and peak memory (process RSS on CPU).

    flock /tmp/fusegpt-cpu.lock .venv/bin/python benchmarks/bench_fusegpt.py --sparsity 0.25 --preset cpu

Results accumulate in ``benchmarks/out/fusegpt.json`` (a killed run continues where it stopped;
``--fresh`` starts over); the Markdown table goes to ``benchmarks/results_fusegpt.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import sys
from pathlib import Path

# Idle OpenMP threads yield instead of spinning: on 2 cores shared with other jobs, spinning made
# a forward 10-30x slower here (measured). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fusegpt import EvalConfig, compress, config_for, evaluate, load_model  # noqa: E402
from fusegpt.methods import GROUP_TRAIN_PRESETS  # noqa: E402
from fusegpt.models import get_adapter  # noqa: E402

GROUP_METHODS = ("fusegpt", "mi+ft")
LABELS = {"dense": "dense", "shortgpt": "ShortGPT", "sleb": "SLEB", "mi": "MI", "mi+ft": "MI+FT", "fusegpt": "FuseGPT",
          "replaceme": "ReplaceMe"}


def _settings(pairs: list[str]) -> dict:
    import ast

    out = {}
    for p in pairs or []:
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def _variant_of(method: str, args) -> str:
    v = _variant(_own(method, args))
    return ", ".join(x for x in (v, "+heal" if args.heal and method != "dense" else "") if x)


def _own(method: str, args) -> dict:
    """Settings over the preset: ``--set METHOD.KEY=VALUE`` for any method, plus ``--set-fusegpt`` /
    ``--set-mift`` for the group methods."""
    own = _settings([p.split(".", 1)[1] for p in args.set if p.split(".", 1)[0] == method])
    if method in GROUP_METHODS:
        own = {**_settings(args.set_fusegpt if method == "fusegpt" else args.set_mift), **own}
    return own


def _variant(own: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(own.items()))


def _label(r: dict) -> str:
    """Method, its variant settings, and where the row came from when not from this script."""
    return LABELS[r["method"]] + (f" ({r['variant']})" if r.get("variant") else "") + \
        (f" [{r['note']}]" if r.get("note") else "")


def run_one(dense, tok, method: str, sparsity: float, args, evalc: EvalConfig) -> dict:
    preset = GROUP_TRAIN_PRESETS[args.preset]
    calib = dict(calib_source=args.calib, nsamples=preset["nsamples"], seqlen=preset["seqlen"],
                 seed=args.seed)
    if method == "dense":
        return {"method": "dense", "variant": "", "sparsity": 0.0, "removed": [], "layers": get_adapter(dense).num_layers,
                "ppl": evaluate(dense, tok, evalc), "wall_s": 0.0, "peak_mb": None, "settings": {}}
    own = _own(method, args)
    extra = dict(preset=args.preset, **own) if method in GROUP_METHODS else dict(own)
    cfg = config_for(method, sparsity=sparsity, **{**calib, **extra})
    model = copy.deepcopy(dense)
    model, rep = compress(model, tok, cfg)
    step = rep.steps[0]
    row = {"method": method, "variant": _variant_of(method, args), "sparsity": sparsity, "removed": rep.removed,
           "layers": rep.layers_after, "ppl": evaluate(model, tok, evalc), "wall_s": round(rep.wall_time_s, 1),
           "peak_mb": rep.peak_memory_mb, "settings": step.config, "groups": step.details.get("groups"),
           "fallbacks": step.details.get("fallbacks"), "iterations": step.iterations}
    if args.heal:  # recovery fine-tuning (cpu preset, the calibration source), then evaluate again
        from fusegpt import HealConfig, heal

        model, rec = heal(model, tok, HealConfig(preset=args.preset, source=args.calib, seed=args.seed))
        row.update(ppl_healed=evaluate(model, tok, evalc), heal=rec)
    del model
    return row


def table(rows: list[dict], sparsity: float) -> list[str]:
    sel = sorted((r for r in rows if r["sparsity"] in (0.0, sparsity)),
                 key=lambda r: (list(LABELS).index(r["method"]), r.get("variant", "")))
    sleb = next((r for r in sel if r["method"] == "sleb"), None)
    lines = ["| method | blocks | ppl wiki | ppl news | vs SLEB (wiki / news) | healed wiki / news "
             "| removed (original idx, order) | wall s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        rel = "-"
        if sleb and r["method"] not in ("dense", "sleb"):
            rel = " / ".join(f"{100 * (r['ppl'][s] / sleb['ppl'][s] - 1):+.1f}%" for s in ("wiki", "news"))
        healed = f"{r['ppl_healed']['wiki']:.2f} / {r['ppl_healed']['news']:.2f}" if r.get("ppl_healed") else "-"
        lines.append(f"| {_label(r)} | {r['layers']} | {r['ppl']['wiki']:.2f} | {r['ppl']['news']:.2f} | {rel} "
                     f"| {healed} | {r['removed'] or '-'} | {r['wall_s']:.0f} | {r['peak_mb'] if r['peak_mb'] else '-'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25])
    ap.add_argument("--methods", default="fusegpt,mi+ft,mi,sleb,shortgpt,dense")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--set-fusegpt", nargs="*", default=[], metavar="KEY=VALUE", help="FuseGPT settings over the preset")
    ap.add_argument("--set-mift", nargs="*", default=[], metavar="KEY=VALUE", help="MI+FT settings over the preset")
    ap.add_argument("--set", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                    help="settings of any method, e.g. shortgpt.linear_fold=ls replaceme.solver=cosine "
                    "replaceme.nsamples=64 (they also name the row's variant)")
    ap.add_argument("--heal", action="store_true", help="heal each pruned model (LoRA, cpu preset) and evaluate again")
    ap.add_argument("--out", default="benchmarks/out/fusegpt.json")
    ap.add_argument("--md", default="benchmarks/results_fusegpt.md")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    ap.add_argument("--import", dest="imports", nargs="*", default=[], metavar="JSON",
                    help="add the rows of other result files of this script (run in parallel) to --out first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    rows: list[dict] = [] if args.fresh or not out.is_file() else json.loads(out.read_text())["rows"]
    command = "flock /tmp/fusegpt-cpu.lock .venv/bin/python benchmarks/bench_fusegpt.py " + shlex.join(sys.argv[1:])
    prev = {} if args.fresh or not out.is_file() else json.loads(out.read_text())
    commands = prev.get("commands") or ([prev["command"]] if prev.get("command") else [])
    for extra in args.imports:
        other = json.loads(Path(extra).read_text())
        for r in other["rows"]:
            if not any(_same(r, q) for q in rows):
                rows.append(r)
        commands += [c for c in other.get("commands", [other.get("command")]) if c and c not in commands]
    commands = [c for c in commands if c != command] + [command]
    if args.imports:
        out.write_text(json.dumps({"args": vars(args), "command": command, "commands": commands, "rows": rows}, indent=1))
    evalc = EvalConfig(data=("wiki", "news"), seqlen=args.eval_seqlen, max_tokens=args.max_tokens)
    dense, tok = load_model(args.model)
    for sparsity in args.sparsity:
        for method in args.methods.split(","):
            s = 0.0 if method == "dense" else sparsity
            variant = _variant_of(method, args)
            if any(_same(r, {"method": method, "sparsity": s, "variant": variant}) for r in rows):
                continue
            row = run_one(dense, tok, method, sparsity, args, evalc)
            rows.append(row)
            print(f"{method} @ {s}: ppl {row['ppl']}, removed {row['removed']}, {row['wall_s']}s", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"args": vars(args), "command": command, "commands": commands, "rows": rows},
                                      indent=1))
            write_md(rows, args, commands)
    print(write_md(rows, args, commands))


def _same(a: dict, b: dict) -> bool:
    return a["method"] == b["method"] and a["sparsity"] == b["sparsity"] and a.get("variant", "") == b.get("variant", "")


def write_md(rows: list[dict], args, commands: list[str]) -> str:
    """The Markdown table of everything measured so far (rewritten after every run)."""
    preset = GROUP_TRAIN_PRESETS[args.preset]
    md = [f"### FuseGPT vs block pruning on SmolLM2-135M-Instruct ({args.preset} preset, seed {args.seed})", "",
          "Commands (rows accumulate in one JSON):", "", *[f"- `{c}`" for c in commands], "",
          f"Perplexity: GPTQ protocol, seqlen {args.eval_seqlen}, first {args.max_tokens} tokens of the `wiki` test "
          f"split and of `news`. Calibration for every ranking: {preset['nsamples']}×{preset['seqlen']} "
          f"tokens of `{args.calib}` train (seed {args.seed}). Wall time: the pruning step on 2 shared CPU cores; "
          "peak memory: process RSS.", ""]
    for sparsity in sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}):
        md += [f"**Sparsity {sparsity}**", "", *table(rows, sparsity), ""]
    for r in rows:
        if r["method"] in GROUP_METHODS:
            keys = ("preset", "loss", "epochs", "ft_nsamples", "ft_seqlen", "group_size", "lora_rank", "coef_rank",
                    "lr_coef", "lr_base", "lr", "batch_size", "training", "warmup", "clip_grad", "val_nsamples",
                    "keep_best", "selection", "trial_candidates")
            st = ", ".join(f"{k}={r['settings'][k]}" for k in keys if k in r["settings"])
            md.append(f"- {_label(r)} @ {r['sparsity']}: {st}; fallbacks {r.get('fallbacks') or 'none'}")
    text = "\n".join(md) + "\n"
    Path(args.md).write_text(text)
    return text


if __name__ == "__main__":
    main()
