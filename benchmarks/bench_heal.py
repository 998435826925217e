"""Recovery by distillation on the embedded model: no heal / LM / KD / KD+LM healing at equal steps and
tokens, what trains, top-k vs online teacher, and LinearPatch vs linear_fold vs neither (issue
"Recovery by distillation").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_heal.py --base sleb25=/work/runs/base/sleb25 \\
        --base fusegpt25=/work/runs/base/fusegpt25 --out benchmarks/results_heal/heal.json

Every cell starts from a pruned checkpoint (``--base NAME=DIR``, pruned by ``fusegpt prune`` with the
``cpu`` preset) and the dense model it was pruned from (``--teacher``, default the embedded SmolLM2),
which stays in memory as the teacher. Variants (``--variants``):

* ``none``: the pruned model as it is;
* ``lm`` / ``kd`` / ``kd+lm``: ``fusegpt.heal`` with the ``cpu`` preset's LoRA healing (64 × 256 ``wiki``
  windows, 1 epoch, rank 8, lr 3e-3; 2e-4 and then 1e-3 earlier on 2026-12-04: ``lm:lr=0.0002`` and
  ``lm:lr=0.001`` reproduce those rows), only the loss differs; KD from the teacher's top-64 logits;
* ``kd-online``: KD with the teacher online (full logits) instead of top-64;
* ``kd-full`` / ``kd-norms``: KD training the LM head and last 2 blocks / only the norms (lr ``--full-lr``);
* ``patch``: LinearPatch at the removed runs (the dense model's statistics, exactly what
  ``--set linear_patch=true`` computes during pruning); ``patch+kd``: then KD on the patches only.

Each cell: perplexity on ``wiki`` and ``news`` (16,384 tokens at seqlen 512) and fidelity to the teacher
on ``wiki`` (KL, top-1 agreement, greedy match of 16 prompts × 32 tokens), heal wall time, peak RSS;
"total minutes" = the base's pruning time + the healing time. Results accumulate in ``--out``
(finished cells are skipped) and a Markdown table is printed; bases split over several processes write
one ``--out`` each (a file is rewritten whole), and ``--table A.json B.json`` prints them as one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fusegpt import EvalConfig, HealConfig, evaluate, heal, load_model, load_pruned  # noqa: E402
from fusegpt.api import evaluate_fidelity  # noqa: E402
from fusegpt.utils import PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("bench_heal")
VARIANTS = ("none", "lm", "kd", "kd+lm", "kd-online", "kd-full", "kd-norms", "patch", "patch+kd")


def heal_config(variant: str, args) -> HealConfig | None:
    """The healing of a variant name; ``NAME:key=value;key=value`` adds settings (``kd:lr=1e-3``)."""
    import ast

    name, _, extra = variant.partition(":")
    over = {}
    for kv in filter(None, extra.split(";")):
        k, _, v = kv.partition("=")
        try:
            over[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            over[k] = v
    cfg = _named(name, args)
    return cfg.with_overrides(**over) if cfg is not None and over else cfg


def _named(variant: str, args) -> HealConfig | None:
    base = dict(preset="cpu", source="wiki")
    if variant in ("none", "patch"):
        return None
    if variant in ("lm", "kd", "kd+lm"):
        return HealConfig(loss=variant, **base)
    if variant == "kd-online":
        return HealConfig(loss="kd", teacher_signal="online", **base)
    if variant == "kd-full":
        return HealConfig(loss="kd", trainable="full", full_blocks=2, lr=args.full_lr, **base)
    if variant == "kd-norms":
        return HealConfig(loss="kd", trainable="norms", lr=args.norms_lr, **base)
    if variant == "patch+kd":
        return HealConfig(loss="kd", trainable="patches", lr=args.patch_lr, **base)
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def add_patches(model, dense, tok, origin: list[int], seed: int = 0) -> list[dict]:
    """LinearPatch after every run of blocks ``model`` lacks (``origin``: its blocks' original indices),
    from the dense model's boundary statistics on 64 × 256 ``wiki`` windows (the cpu preset's)."""
    from fusegpt.data import calibration_windows
    from fusegpt.linear_patch import apply_patches, boundary_stats, rotation
    from fusegpt.models import get_adapter

    d = get_adapter(dense)
    windows = calibration_windows(tok, "wiki", 64, 256, seed)
    R, kind = rotation(d.config.hidden_size, seed)
    stats = boundary_stats(d, windows, R)
    removed = [i for i in range(d.num_layers) if i not in origin]
    return apply_patches(get_adapter(model, origin), list(range(d.num_layers)), removed, stats, R, kind)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--teacher", default=None, help="the dense model (default: the embedded SmolLM2)")
    ap.add_argument("--variants", default="none,lm,kd,kd+lm")
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--norms-lr", type=float, default=1e-3)
    ap.add_argument("--patch-lr", type=float, default=1e-4)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--eval-data", default="wiki,news")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results_heal" / "heal.json"))
    ap.add_argument("--table", nargs="+", metavar="JSON", default=None,
                    help="print one table of these result files (runs split over processes) and stop")
    args = ap.parse_args()
    if args.table:
        missing = [f for f in args.table if not Path(f).is_file()]
        if missing:
            raise SystemExit(f"bench_heal: no result file {', '.join(missing)} (give the --out files of earlier runs)")
        merged: dict = {}
        for f in args.table:  # cells keyed per file: two files may both hold a "sleb25|kd" (run at other rates)
            merged.update({k if _is_dense(k) else f"{f}#{k}": v
                           for k, v in json.loads(Path(f).read_text()).items()})
        print(table(merged))
        print()
        print(loss_pairs(merged))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.is_file() else {}
    ev = EvalConfig(data=tuple(args.eval_data.split(",")), seqlen=512, max_tokens=args.max_tokens)
    fid = EvalConfig(data=("wiki",), seqlen=512, max_tokens=args.max_tokens, fidelity=True)
    dense, tok = load_model(args.teacher)
    dense.eval()
    dense_key = "dense" if args.teacher is None else f"dense:{args.teacher}"
    if dense_key not in res:
        res[dense_key] = {"ppl": evaluate(dense, tok, ev)}
        out.write_text(json.dumps(res, indent=1))
    for spec in args.base:
        name, _, folder = spec.partition("=")
        rep = json.loads((Path(folder) / "report.json").read_text())
        origin = rep["extra"]["origin"]
        for variant in args.variants.split(","):
            key = f"{name}|{variant}"
            if key in res:
                continue
            cfg = heal_config(variant, args)
            model, _ = load_pruned(folder)
            t0 = time.perf_counter()
            cell = {"base": name, "variant": variant, "prune_s": rep["wall_time_s"]}
            with PeakMemory("cpu") as mem:
                if variant.split(":")[0].startswith("patch"):
                    cell["patches"] = add_patches(model, dense, tok, origin)
                if cfg is not None:
                    model, h = heal(model, tok, cfg, teacher_model=dense if cfg.uses_teacher else None,
                                    teacher_name="dense")
                    cell["heal"] = h.to_dict()
            cell["repair_s"] = round(time.perf_counter() - t0, 1)
            cell["peak_mb"] = round(mem.peak_mb, 1)
            cell["ppl"] = evaluate(model, tok, ev)
            if not args.no_fidelity:
                cell["fidelity"] = evaluate_fidelity(model, dense, tok, fid)["wiki"]
            cell["total_min"] = round((cell["prune_s"] + cell["repair_s"]) / 60, 1)
            res[key] = cell
            logger.info("%s: %s", key, {k: cell[k] for k in ("ppl", "repair_s", "total_min")})
            out.write_text(json.dumps(res, indent=1))
            del model
    print(table(res))
    return 0


def _is_dense(key: str) -> bool:
    """A dense model's row: ``dense`` (the embedded SmolLM2) or ``dense:TEACHER``."""
    return key == "dense" or key.startswith("dense:")


def table(res: dict) -> str:
    lines = []
    for key in sorted(filter(_is_dense, res)):
        d = res[key]["ppl"]
        teacher = key.partition(":")[2] or "the embedded SmolLM2"
        lines.append(f"dense ({teacher}): wiki {d['wiki']:.2f}, news {d['news']:.2f}  ")
    lines += ["",
             "| base | repair | lr | ppl wiki | ppl news | KL to dense | top-1 | gen. match mean / median | train "
             "loss (LM) before → after | repair s | total min | peak MB |", "|" + "---|" * 12]
    for key, c in res.items():
        if _is_dense(key):
            continue
        f = c.get("fidelity")
        h = c.get("heal")
        lm = f"{h['loss_before']:.3f} → {h['loss_after']:.3f}" if h else "–"
        fid = (f"{f['kl']:.4f} | {f['top1']:.4f} | {f['gen_match_mean']:.1f} / {f['gen_match_median']:.1f}" if f
               else "– | – | –")
        ppl = " | ".join(f"{c['ppl'][s]:.2f}" if s in c["ppl"] else "–" for s in ("wiki", "news"))
        lr = f"{h['settings']['lr']:g}" if h else "–"  # the rate the cell ran at (the preset's changed)
        lines.append(f"| {c['base']} | {c['variant']} | {lr} | {ppl} | {fid} | {lm} | {c['repair_s']:.0f} | "
                     f"{c['total_min']:.1f} | {c['peak_mb']:.0f} |")
    return "\n".join(lines)


def loss_pairs(res: dict) -> str:
    """KD and KD+LM against LM healing of the same base at the same rate, epochs and trainable part (equal
    windows and steps): relative perplexity (negative = lower than LM) and the fidelity pair."""
    cells: dict[tuple, dict] = {}
    for c in res.values():
        h = c.get("heal")
        if h and c.get("fidelity"):
            s = h["settings"]
            cells[(c["base"], s["lr"], s["epochs"], s["trainable"], s["loss"])] = c
    lines = ["| base | lr | epochs | loss | wiki vs LM | news vs LM | KL (vs LM's) | top-1 (vs LM's) |",
             "|" + "---|" * 8]
    for (base, lr, epochs, trainable, loss), lm in cells.items():
        if loss != "lm":
            continue
        for other in ("kd", "kd+lm"):
            o = cells.get((base, lr, epochs, trainable, other))
            if o is None:
                continue
            rel = " | ".join(f"{100 * (o['ppl'][s] / lm['ppl'][s] - 1):+.1f}%" for s in ("wiki", "news"))
            lines.append(f"| {base} | {lr:g} | {epochs} | {other} | {rel} | {o['fidelity']['kl']:.3f} "
                         f"({lm['fidelity']['kl']:.3f}) | {o['fidelity']['top1']:.3f} ({lm['fidelity']['top1']:.3f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
