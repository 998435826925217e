"""Sweeps: every method × sparsity pruned once from the same dense model, evaluated, tabulated.

    fusegpt sweep --methods shortgpt,sleb,mi --sparsity 0.125,0.25 --output runs/sweep

Layout of the output folder::

    DIR/dense.json                 dense model: perplexity (and zero-shot) measured once
    DIR/<method>-<sparsity>/       each cell's checkpoint + report.json (written atomically)
    DIR/sweep.json, DIR/sweep.md   the Table-I-shaped table (methods × sparsity × data sets)

A cell whose ``report.json`` exists is finished and skipped, so an interrupted sweep resumes
by running the same command again. Every cell starts from a deep copy of the one dense model
loaded at the start; the calibration windows are tokenized once (the token cache is keyed by
the tokenizer) and shared by all cells. SLEB and MI are greedy and deterministic (one block per
iteration), so a larger sparsity continues from the same method's smaller one instead of
repeating its iterations (recorded as ``extra.sweep.continued_from``; wall time includes both).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .api import Placement, configs_for, prune
from .checkpoint.atomic import output_lock
from .checkpoint.ownership import OwnedFolder, check_replaceable
from .data import check_source
from .loading import load_model, load_tokenizer
from .methods import registry
from .report import Report, StepReport
from .settings import ConfigError, EvalConfig, PruneConfig, blocks_to_remove

logger = logging.getLogger(__name__)

CALIB_KEYS = ("nsamples", "seqlen", "seed", "calib_source", "preset")


def cell_name(method: str, sparsity: float) -> str:
    return f"{method}-{sparsity:g}"


def sweep_configs(methods: Sequence[str], sparsities: Sequence[float], settings: dict[str, Any] | None = None,
                  ) -> dict[tuple[str, float], PruneConfig]:
    """One (unresolved) config per (method, sparsity). ``settings``: calibration keys and ``preset``
    apply to every method; any other key (``--set`` values) goes to the methods whose config has
    that field, and a key that no method has is an error."""
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    classes = {m: registry.get(m).config_cls for m in methods}
    own_keys = set(settings) - set(CALIB_KEYS)
    used = {k for k in own_keys for cls in classes.values() if k in cls.setting_names()}
    if own_keys - used:
        raise ConfigError(f"no method in this sweep has setting(s) {', '.join(sorted(own_keys - used))}")
    out = {}
    for m, cls in classes.items():
        kw = {k: v for k, v in settings.items() if k in cls.setting_names()}
        for s in sparsities:
            out[(m, float(s))] = configs_for(m, float(s), **kw)[0]
    return out


def _continuation(prev: tuple[Any, dict[str, Any]] | None, cfg: PruneConfig, n_dense: int, device: str,
                  ) -> tuple[Any, dict[str, Any], list[int]] | None:
    """The model, report and block origin of the same method's smaller-sparsity cell, when ``cfg``
    can continue it (a method whose record says ``continues_smaller``: greedy and deterministic, so
    the first k₁ removals of a k₂-block run are exactly the k₁-block run)."""
    if prev is None:
        return None
    model, rep = prev
    old = dict(rep["steps"][0]["config"]) if len(rep.get("steps", [])) == 1 else None
    new = cfg.to_dict()
    skip = ("sparsity", "origins")
    if old is None or {k: v for k, v in old.items() if k not in skip} != {k: v for k, v in new.items() if k not in skip}:
        return None
    if len(rep["removed"]) >= blocks_to_remove(n_dense, cfg.sparsity):
        return None
    origin = [i for i in range(n_dense) if i not in set(rep["removed"])]
    if model is None:  # finished in an earlier invocation: reload its checkpoint
        model, _ = load_model(str(rep["path"]), device=device)
        rep = {k: v for k, v in rep.items() if k != "path"}
    return model, rep, origin


def cell_differences(report: dict[str, Any], cfg: PruneConfig, eval_settings: dict[str, Any]) -> list[str]:
    """What differs between a finished cell's report and the settings it would be run with now."""
    steps = report.get("steps") or [{}]
    old = {k: v for k, v in (steps[0].get("config") or {}).items() if k not in ("origins", "calib")}
    new = {k: v for k, v in cfg.to_dict().items() if k not in ("origins", "calib")}
    out = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    have = report.get("eval_settings") or {}
    out += [f"evaluation {k}: {have.get(k)!r} -> {v!r}" for k, v in eval_settings.items() if have.get(k) != v]
    return out


def _merge(prev: dict[str, Any], report: Report, cfg: PruneConfig) -> None:
    """Make ``report`` one report for the whole run: the earlier cell's iterations, then this run's."""
    step = report.steps[0]
    p = prev["steps"][0]
    iters = [dict(it) for it in p["iterations"]] + [dict(it) for it in step.iterations]
    for i, it in enumerate(iters):
        it["iteration"] = i
    merged = StepReport(method=step.method, config=cfg.to_dict(), removed=list(p["removed"]) + list(step.removed),
                        iterations=iters, details={**p.get("details", {}), **step.details},
                        wall_time_s=p["wall_time_s"] + step.wall_time_s,
                        peak_memory_mb=max(x for x in (p.get("peak_memory_mb"), step.peak_memory_mb) if x is not None)
                        if (p.get("peak_memory_mb") or step.peak_memory_mb) else None)
    report.steps = [merged]
    report.layers_before = prev["layers_before"]
    report.params_before = prev["params_before"]
    report.wall_time_s = prev["wall_time_s"] + report.wall_time_s
    report.peak_memory_mb = merged.peak_memory_mb
    report.extra["sweep"] = {"continued_from": prev["extra"]["sweep"]["cell"],
                             "note": "the first iterations are the continued cell's; wall time includes them"}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


SWEEP_FILES = ("dense.json", "sweep.json", "sweep.md", "speed.json")


def run_sweep(
    methods: Sequence[str],
    sparsities: Sequence[float],
    output: str | Path,
    model_spec: str | None = None,
    settings: dict[str, Any] | None = None,
    eval_config: EvalConfig | None = None,
    tasks: Sequence[str] | None = None,
    zeroshot_kw: dict[str, Any] | None = None,
    save_checkpoints: bool = True,
    device: str = "cpu",
    speed: Sequence[str] = (),
    speed_rounds: int = 3,
    speed_threads: int = 1,
) -> dict[str, Any]:
    """Run (or resume) the sweep into ``output``; returns the table (also in ``sweep.json``).

    Every cell goes through :func:`fusegpt.prune` with a copy of the one dense model. ``speed``: runtimes
    to time every cell and the dense model in (``llamacpp:f16``, ``llamacpp:q4_k_m``, ``torch``), in
    alternating rounds, once the cells are pruned; the table then has a quality-vs-speed section
    with the Pareto front (``speed.json``).
    """
    runtimes = parse_speed(speed)
    if runtimes and not save_checkpoints:
        raise ConfigError("timing the cells (--speed) needs their checkpoints; drop --no-checkpoints")
    eval_config = eval_config or EvalConfig()
    configs = sweep_configs(methods, sparsities, settings)
    out = Path(output).expanduser()
    kind = torch.device(device).type
    folder = OwnedFolder(out, "sweep")
    folder.check(SWEEP_FILES)  # a user's own sweep.md is never written over
    for (m, s) in configs:
        cell = out / cell_name(m, s)
        if cell.exists():
            check_replaceable(cell, "sweep cell")
    for src in {x for c in configs.values() for x in c.resolve(kind).sources()} | set(eval_config.data):
        check_source(src)  # before the model is loaded
    with output_lock(out):
        table = _run_sweep(methods, sparsities, out, folder, model_spec, configs, eval_config, tasks, zeroshot_kw,
                           save_checkpoints, device)
        if runtimes:
            folder.write_text("speed.json", json.dumps(time_cells(out, table, model_spec, runtimes, speed_rounds,
                                                                   speed_threads, device), indent=2) + "\n")
            table = collect(out, methods, sparsities)
            folder.write_text("sweep.json", json.dumps(table, indent=2) + "\n")
            folder.write_text("sweep.md", to_markdown(table))
        return table


def parse_speed(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["llamacpp:f16,q4_k_m", "torch"]`` → ``{"llamacpp": ["f16", "q4_k_m"], "torch": []}`` (checked)."""
    from .bench import check_runtime

    out: dict[str, list[str]] = {}
    for spec in specs:
        runtime, _, types = spec.partition(":")
        dtypes = [t for t in types.split(",") if t] or (["f16"] if runtime == "llamacpp" else [])
        check_runtime(runtime, dtypes)
        out.setdefault(runtime, [])
        out[runtime] += [d for d in dtypes if d not in out[runtime]]
    return out


def time_cells(out: Path, table: dict[str, Any], model_spec, runtimes: dict[str, list[str]], rounds: int,
               threads: int, device: str) -> dict[str, Any]:
    """Speed-ups of every cell against the dense model, per runtime (and GGUF type)."""
    from .bench import bench_llamacpp
    from .eval.speed import bench_models

    cells = [r["cell"] for r in table["rows"]]
    specs = [model_spec, *[str(out / c) for c in cells]]
    result: dict[str, Any] = {}
    if "llamacpp" in runtimes:
        res = bench_llamacpp(specs, runtimes["llamacpp"], rounds=rounds, threads=threads, names=["dense", *cells],
                             skip_unexportable=True)
        for dtype in runtimes["llamacpp"]:
            result[f"llamacpp:{dtype}"] = {m["model"]: {"pp": m["cells"][dtype]["pp_speedup"],
                                                        "tg": m["cells"][dtype]["tg_speedup"],
                                                        "ideal": m["ideal_speedup_blocks"]} for m in res["models"]}
        result["llamacpp_raw"] = res
    if "torch" in runtimes:
        from .loading import model_config

        ctx = getattr(model_config(model_spec).get_text_config(), "max_position_embeddings", None) or 4096
        res = bench_models(specs, batch_sizes=(1,), lengths=(min(512, ctx - 33),), decode_tokens=32, warmup=1, repeats=1,
                           device=device, threads=threads, rounds=rounds)
        result["torch"] = {name: {"pp": m["rows"][0].get("prefill_speedup", 1.0),
                                  "tg": m["rows"][0].get("decode_speedup", 1.0), "ideal": m["ideal_speedup_blocks"]}
                           for name, m in zip(["dense", *cells], res["models"], strict=True) if m["rows"]}
        result["torch_raw"] = res
    return result


def _run_sweep(methods, sparsities, out: Path, folder: OwnedFolder, model_spec, configs, eval_config: EvalConfig,
               tasks, zeroshot_kw, save_checkpoints: bool, device: str) -> dict[str, Any]:
    from . import api

    kind = torch.device(device).type
    tok = load_tokenizer(model_spec)
    resolved = [c.resolve(kind) for c in configs.values()]
    api.check_windows(tok, resolved)  # every text long enough, before the model is loaded
    model, tok = load_model(model_spec, device=device)
    for r in resolved:  # every budget checked before any long work
        api.check_plan(model, [r])

    def zs(m) -> dict[str, Any] | None:
        if not tasks:
            return None
        from .eval.zeroshot import zeroshot

        return zeroshot(m, tok, tasks, **(zeroshot_kw or {}))

    dense_path = out / "dense.json"
    eval_settings = {"data": list(eval_config.data), "seqlen": eval_config.seqlen, "max_tokens": eval_config.max_tokens}
    dense = _read_json(dense_path) if dense_path.is_file() else None
    if dense is None or dense.get("eval_settings") != eval_settings or (tasks and not dense.get("zeroshot")):
        logger.info("evaluating the dense model")
        from .utils import count_params

        dense = {"model": model_spec or "embedded:SmolLM2-135M-Instruct", "eval_settings": eval_settings,
                 "perplexity": api.evaluate(model, tok, eval_config), "params": count_params(model),
                 "layers": model.config.num_hidden_layers, "zeroshot": zs(model)}
        folder.write_text("dense.json", json.dumps(dense, indent=2) + "\n")

    last: dict[str, tuple[Any, dict[str, Any]] | None] = {}  # method -> (pruned model, report dict) of its last cell
    for m in methods:
        continues = registry.get(m).continues_smaller
        for s in sorted(float(x) for x in sparsities):
            cfg = configs[(m, s)].resolve(kind)
            cell = out / cell_name(m, s)
            if (cell / "report.json").is_file():
                old = _read_json(cell / "report.json")
                diff = cell_differences(old, cfg, eval_settings)
                if not diff:
                    logger.info("%s: finished earlier with the same settings, skipped", cell.name)
                    last.pop(m, None)
                    if continues and (cell / "config.json").is_file():
                        last[m] = (None, {"path": cell, **old})
                    continue
                logger.warning("%s: finished earlier with other settings (%s); pruning it again", cell.name,
                               "; ".join(diff))
            prev = _continuation(last.get(m), cfg, dense["layers"], device)
            state = Path(f"{cell}.state")
            resume = state.is_dir() and any(state.iterdir())

            def finish(pruned, report, prev=prev, cell=cell, cfg=cfg) -> None:
                if prev is not None:
                    _merge(prev[1], report, cfg)
                report.eval_settings = eval_settings
                report.extra.setdefault("sweep", {}).update(cell=cell.name)
                z = zs(pruned)
                if z is not None:
                    report.extra["zeroshot"] = z

            common = dict(eval_config=eval_config, overwrite=True, resume=resume, tokenizer=tok,
                          teacher_model=model if eval_config.fidelity else None,
                          baseline_perplexity=dense["perplexity"], before_save=finish, save_model=save_checkpoints,
                          model_name=dense["model"], placement=Placement(device=device))
            if prev is not None:
                base_model, prev_rep, origin = prev
                n_now = len(origin)
                step_cfg = cfg.with_overrides(sparsity=(blocks_to_remove(dense["layers"], s) - len(prev_rep["removed"]))
                                              / n_now - 1e-12)
                logger.info("%s: continuing %s's greedy removal (%d blocks done)", cell.name,
                            prev_rep["extra"]["sweep"]["cell"], len(prev_rep["removed"]))
                res = prune(model_spec, step_cfg, cell, model=copy.deepcopy(base_model), origin=origin, **common)
            else:
                logger.info("%s: pruning", cell.name)
                res = prune(model_spec, cfg, cell, model=copy.deepcopy(model), **common)
            last[m] = (res.extra["model"], res.report.to_dict()) if continues else None
    table = collect(out, methods, sparsities)
    folder.write_text("sweep.json", json.dumps(table, indent=2) + "\n")
    folder.write_text("sweep.md", to_markdown(table))
    logger.info("wrote %s and %s", out / "sweep.md", out / "sweep.json")
    return table


def collect(out: str | Path, methods: Sequence[str] | None = None, sparsities: Sequence[float] | None = None,
            ) -> dict[str, Any]:
    """Read ``dense.json`` and the cells' reports into the sweep table (all cells found if not named)."""
    out = Path(out)
    dense = _read_json(out / "dense.json") if (out / "dense.json").is_file() else {}
    if methods is None or sparsities is None:
        found = []
        for rep in sorted(out.glob("*/report.json")):
            d = _read_json(rep)
            cell = d.get("extra", {}).get("sweep", {}).get("cell")
            if cell:
                found.append((d["method"], float(d["steps"][0]["config"]["sparsity"])))
        methods = methods or list(dict.fromkeys(m for m, _ in found))
        sparsities = sparsities or sorted({s for _, s in found})
    rows = []
    for m in methods:
        for s in sparsities:
            rep = out / cell_name(m, float(s)) / "report.json"
            if not rep.is_file():
                continue
            d = _read_json(rep)
            step = d["steps"][0]
            z = d.get("extra", {}).get("zeroshot")
            rows.append({
                "method": m, "sparsity": float(s), "cell": cell_name(m, float(s)),
                "perplexity": d["perplexity"].get("after", {}), "params": d["params_after"],
                "layers": d["layers_after"], "removed": d["removed"], "calib": step["config"].get("calib"),
                "wall_time_s": round(d["wall_time_s"], 1), "peak_memory_mb": d.get("peak_memory_mb"),
                "zeroshot": _zs_brief(z), "fidelity": (d.get("fidelity") or {}).get("after"),
            })
    speed = _read_json(out / "speed.json") if (out / "speed.json").is_file() else {}
    return {
        "dense": {**{k: dense.get(k) for k in ("model", "params", "layers", "perplexity")},
                  "zeroshot": _zs_brief(dense.get("zeroshot"))},
        "eval_settings": dense.get("eval_settings"),
        "methods": list(methods), "sparsities": [float(s) for s in sparsities], "rows": rows,
        "speed": {k: v for k, v in speed.items() if not k.endswith("_raw")},
        "versions": _versions(),
    }


def quality_vs_speed(table: dict[str, Any], runtime: str, source: str) -> list[dict[str, Any]]:
    """Every cell (and dense) with its speed-ups in ``runtime`` and perplexity on ``source``, fastest first;
    ``front``: on the Pareto front of (the smaller of the pp and tg speed-ups, perplexity)."""
    from .bench import pareto

    speeds = table.get("speed", {}).get(runtime) or {}
    pts = [{"cell": "dense", "ppl": (table["dense"].get("perplexity") or {}).get(source)}]
    pts += [{"cell": r["cell"], "method": r["method"], "sparsity": r["sparsity"], "ppl": r["perplexity"].get(source)}
            for r in table["rows"]]
    pts = [{**p, **speeds[p["cell"]]} for p in pts if p["cell"] in speeds and p["ppl"] is not None]
    for p, on in zip(pts, pareto([(min(p["pp"], p["tg"]), p["ppl"]) for p in pts]), strict=True):
        p["front"] = on
    return sorted(pts, key=lambda p: -min(p["pp"], p["tg"]))


def _zs_brief(z: dict[str, Any] | None) -> dict[str, Any] | None:
    if not z:
        return None
    # a sweep stores zeroshot()'s result ({"tasks": ...}); `fusegpt eval --tasks` merges a flat task map
    tasks = z["tasks"] if isinstance(z.get("tasks"), dict) else z
    return {t: {k: r.get(k) for k in ("acc", "acc_norm") if r.get(k) is not None} for t, r in tasks.items()
            if isinstance(r, dict)}


def _versions() -> dict[str, str]:
    from .report import library_versions

    return library_versions()


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def to_markdown(table: dict[str, Any]) -> str:
    """Table I shape: one row per method, a column per (sparsity, data set); then the details."""
    dense, rows = table["dense"], table["rows"]
    data = list((dense.get("perplexity") or {}).keys()) or sorted({k for r in rows for k in r["perplexity"]})
    sps = table["sparsities"]
    es = table.get("eval_settings") or {}
    lines = [f"Perplexity (lower is better), {dense.get('model') or 'model'}; eval seqlen {es.get('seqlen')}, "
             f"max tokens {es.get('max_tokens')} per source.", ""]
    head = ["Method"] + [f"{s:g} {d}" for s in sps for d in data]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| dense | " + " | ".join(_f((dense.get("perplexity") or {}).get(d)) for _ in sps for d in data) + " |")
    by = {(r["method"], r["sparsity"]): r for r in rows}
    for m in table["methods"]:
        cells = [_f(by[(m, s)]["perplexity"].get(d)) if (m, s) in by else "–" for s in sps for d in data]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| cell | layers | params | removed (original index, removal order) | calibration | prune time s "
                  "| peak MB |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| dense | {dense.get('layers')} | {dense.get('params') or 0:,} | – | – | – | – |")
    for r in rows:
        c = r.get("calib") or {}
        calib = f"{Path(str(c.get('source'))).name} {c.get('nsamples')}×{c.get('seqlen')}" if c else "–"
        lines.append(f"| {r['cell']} | {r['layers']} | {r['params']:,} | {r['removed']} | {calib} | "
                     f"{r['wall_time_s']:.0f} | {_f(r['peak_memory_mb'], 0)} |")
    lines += ["", "Prune time excludes evaluation (for a continued SLEB/MI cell it includes the smaller cell's "
              "iterations). Peak MB: CUDA allocator peak on GPU; process RSS on CPU, which includes the dense "
              "model the sweep keeps for the other cells."]
    if data and any(r.get("fidelity") for r in rows):
        lines += ["", f"Fidelity to the dense model on {data[0]} (KL(dense ‖ cell) per token, top-1 agreement, greedy "
                      "tokens matching the dense model's before the first difference)", "",
                  "| cell | KL | top-1 | gen. match mean | gen. match median |", "|---|---|---|---|---|"]
        for r in rows:
            f = (r.get("fidelity") or {}).get(data[0])
            if f:
                lines.append(f"| {r['cell']} | {f['kl']:.4f} | {f['top1']:.4f} | {_f(f['gen_match_mean'], 1)} | "
                             f"{_f(f['gen_match_median'], 1)} |")
    for runtime in sorted(table.get("speed") or {}):
        pts = quality_vs_speed(table, runtime, data[0]) if data else []
        if not pts:
            continue
        lines += ["", f"Quality vs speed in {runtime} (speed-up against dense: pp = prompt, tg = generation; "
                      f"★ = Pareto front of min(pp, tg) and {data[0]} perplexity: no other cell is faster and better)",
                  "", "| cell | pp × | tg × | ideal × | " + " | ".join(f"ppl {d}" for d in data) + " | front |",
                  "|" + "---|" * (5 + len(data))]
        ppl = {"dense": dense.get("perplexity") or {}, **{r["cell"]: r["perplexity"] for r in rows}}
        for p in pts:
            lines.append(f"| {p['cell']} | {p['pp']:.2f} | {p['tg']:.2f} | {p['ideal']:.2f} | "
                         + " | ".join(_f(ppl[p["cell"]].get(d)) for d in data) + f" | {'★' if p['front'] else ''} |")
    zs_tasks = sorted({t for r in [dense, *rows] for t in (r.get("zeroshot") or {})})
    if zs_tasks:
        lines += ["", "Zero-shot accuracy (acc / acc_norm; *_proxy = offline proxy, not the published benchmark)", "",
                  "| cell | " + " | ".join(zs_tasks) + " |", "|" + "---|" * (len(zs_tasks) + 1)]
        for name, r in [("dense", dense), *[(r["cell"], r) for r in rows]]:
            z = r.get("zeroshot") or {}
            cells = [" / ".join(_f(z.get(t, {}).get(k), 3) for k in ("acc", "acc_norm") if k in z.get(t, {})) or "–"
                     for t in zs_tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

