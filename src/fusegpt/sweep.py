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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import METHOD_CONFIGS, ConfigError, EvalConfig, PruneConfig, blocks_to_remove, config_for
from .models import get_adapter

logger = logging.getLogger(__name__)

CALIB_KEYS = ("nsamples", "seqlen", "seed", "calib_source")
CONTINUABLE = ("sleb", "mi")  # greedy one-block-per-iteration methods without randomness


def cell_name(method: str, sparsity: float) -> str:
    return f"{method}-{sparsity:g}"


def sweep_configs(methods: Sequence[str], sparsities: Sequence[float], settings: dict[str, Any] | None = None,
                  ) -> dict[tuple[str, float], PruneConfig]:
    """One config per (method, sparsity). ``settings``: calibration keys apply to every method;
    any other key (``preset``, ``--set`` values) goes to the methods whose config has that field,
    and a key that no method has is an error."""
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    for m in methods:
        if m not in METHOD_CONFIGS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(sorted(METHOD_CONFIGS))}")
    own_keys = set(settings) - set(CALIB_KEYS)
    used = {k for k in own_keys for m in methods if k in METHOD_CONFIGS[m].__dataclass_fields__}
    if own_keys - used:
        raise ConfigError(f"no method in this sweep has setting(s) {', '.join(sorted(own_keys - used))}")
    out = {}
    for m in methods:
        fields = METHOD_CONFIGS[m].__dataclass_fields__
        kw = {k: v for k, v in settings.items() if k in CALIB_KEYS or k in fields}
        for s in sparsities:
            out[(m, float(s))] = config_for(m, sparsity=float(s), **kw)
    return out


def _continuation(prev: tuple[Any, dict[str, Any]] | None, cfg: PruneConfig, n_dense: int, load_model, device: str,
                  ) -> tuple[Any, dict[str, Any]] | None:
    """The model and report of the same method's smaller-sparsity cell, when ``cfg`` can continue it.

    SLEB and MI remove one block per iteration, greedily and without randomness, so the first
    k₁ removals of a k₂-block run are exactly the k₁-block run: the larger cell continues from
    the smaller one (same config apart from the sparsity, same calibration windows).
    """
    if prev is None:
        return None
    model, rep = prev
    old = dict(rep["steps"][0]["config"]) if len(rep.get("steps", [])) == 1 else None
    new = cfg.to_dict()
    if old is None or {k: v for k, v in old.items() if k != "sparsity"} != {k: v for k, v in new.items() if k != "sparsity"}:
        return None
    if len(rep["removed"]) >= blocks_to_remove(n_dense, cfg.sparsity):
        return None
    if model is None:  # finished in an earlier invocation: reload its checkpoint
        model, _ = load_model(str(rep["path"]), device=device)
        model._fusegpt_origin = [i for i in range(n_dense) if i not in set(rep["removed"])]
        rep = {k: v for k, v in rep.items() if k != "path"}
    return model, rep


def _merge(prev: dict[str, Any], report, cfg: PruneConfig):
    """One report for the whole run: the earlier cell's iterations, then this run's."""
    from .report import Report, StepReport

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
    return Report(model=report.model, seed=report.seed, steps=[merged], layers_before=prev["layers_before"],
                  layers_after=report.layers_after, params_before=prev["params_before"],
                  params_after=report.params_after, wall_time_s=prev["wall_time_s"] + report.wall_time_s,
                  peak_memory_mb=merged.peak_memory_mb, device=report.device, versions=report.versions,
                  extra={"sweep": {"continued_from": prev["extra"]["sweep"]["cell"],
                                   "note": "the first iterations are the continued cell's; wall time includes them"}})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


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
) -> dict[str, Any]:
    """Run (or resume) the sweep into ``output``; returns the table (also in ``sweep.json``)."""
    from . import api
    from .checkpoint import atomic_write_dir, save_pruned
    from .data import calibration_windows
    from .loading import load_model

    eval_config = eval_config or EvalConfig()
    configs = sweep_configs(methods, sparsities, settings)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(model_spec, device=device)
    api._load_method_plugins()
    for cfg in configs.values():  # every budget and data source checked before any long work
        api.check_plan(model, [cfg])
        calibration_windows(tok, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed)

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
        _write_json(dense_path, dense)

    last: dict[str, tuple[Any, dict[str, Any]]] = {}  # method -> (pruned model, report dict) of its last cell
    for m in methods:
        for s in sorted(float(x) for x in sparsities):
            cfg = configs[(m, s)]
            cell = out / cell_name(m, s)
            if (cell / "report.json").is_file():
                logger.info("%s: finished earlier, skipped", cell.name)
                last.pop(m, None)
                if m in CONTINUABLE and (cell / "config.json").is_file():
                    last[m] = (None, {"path": cell, **_read_json(cell / "report.json")})
                continue
            if "state_dir" in type(cfg).__dataclass_fields__:  # per-block state of FuseGPT / MI+FT
                state = Path(f"{cell}.state")
                cfg = cfg.with_overrides(state_dir=str(state), resume=state.is_dir() and any(state.iterdir()))
            prev = _continuation(last.get(m), cfg, dense["layers"], load_model, device)
            if prev is not None:
                base_model, prev_rep = prev
                pruned = copy.deepcopy(base_model)
                step_cfg = cfg.with_overrides(sparsity=(blocks_to_remove(dense["layers"], s) - len(prev_rep["removed"]))
                                              / get_adapter(pruned).num_layers - 1e-12)
                logger.info("%s: continuing %s's greedy removal (%d blocks done)", cell.name,
                            prev_rep["extra"]["sweep"]["cell"], len(prev_rep["removed"]))
                pruned, report = api.compress(pruned, tok, step_cfg, model_name=dense["model"])
                report = _merge(prev_rep, report, cfg)
            else:
                logger.info("%s: pruning", cell.name)
                pruned = copy.deepcopy(model)
                pruned, report = api.compress(pruned, tok, cfg, model_name=dense["model"])
            report.perplexity["before"] = dict(dense["perplexity"])
            t0 = time.perf_counter()
            report.perplexity["after"] = api.evaluate(pruned, tok, eval_config)
            report.eval_settings = eval_settings
            report.extra.setdefault("sweep", {}).update(cell=cell.name, eval_time_s=round(time.perf_counter() - t0, 1))
            z = zs(pruned)
            if z is not None:
                report.extra["zeroshot"] = z
            if save_checkpoints:
                save_pruned(pruned, tok, cell, report, overwrite=True)
            else:
                atomic_write_dir(cell, lambda tmp, r=report: r.save(tmp / "report.json"), overwrite=True)
            if getattr(cfg, "state_dir", None):
                import shutil

                shutil.rmtree(cfg.state_dir, ignore_errors=True)
            last[m] = (pruned, report.to_dict()) if m in CONTINUABLE else None
    table = collect(out, methods, sparsities)
    _write_json(out / "sweep.json", table)
    (out / "sweep.md").write_text(to_markdown(table))
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
                "zeroshot": _zs_brief(z),
            })
    return {
        "dense": {**{k: dense.get(k) for k in ("model", "params", "layers", "perplexity")},
                  "zeroshot": _zs_brief(dense.get("zeroshot"))},
        "eval_settings": dense.get("eval_settings"),
        "methods": list(methods), "sparsities": [float(s) for s in sparsities], "rows": rows,
        "versions": _versions(),
    }


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

