"""Render a run's ``report.json`` (or a sweep folder) to a Markdown page with PNG plots.

    fusegpt report runs/mi25          # -> runs/mi25/report.md + report_*.png
    fusegpt report runs/sweep         # -> runs/sweep/report.md + sweep_ppl.png

Plots of a run (each only when the report holds its data):

- importance scores per block at every iteration (heatmap; the removed block is marked);
- which block went when (original index → removal order);
- fusion loss per epoch for each group (FuseGPT / MI+FT, ``steps[].details.groups``);
- per-layer attention heads and FFN widths before/after (width pruning, ``details.layers``).

A sweep folder (``sweep.json``) gets perplexity-vs-sparsity curves per method and data set.
matplotlib is optional (extra ``plots``) and imported here only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .checkpoint.ownership import OwnedFolder, remove_staging, staging_dir
from .errors import FusegptError, ReportError
from .report import Report

logger = logging.getLogger(__name__)


class PlotsUnavailable(FusegptError, ValueError):
    """matplotlib is missing; the message names the extra."""


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable("plots need matplotlib: pip install 'fusegpt[plots]'") from None
    return plt


def render(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the Markdown page (default ``run_dir/report.md``) and its PNGs beside it; return the page."""
    run_dir = Path(run_dir)
    page = Path(output) if output else run_dir / "report.md"
    if (run_dir / "sweep.json").is_file():
        table = read_json(run_dir / "sweep.json")
        return _published(page, lambda staged: render_sweep_table(table, staged))
    rep = run_dir / "report.json"
    if not rep.is_file():
        raise ReportError(f"{run_dir} holds neither report.json nor sweep.json; give a run or sweep folder")
    d = Report.load(rep).to_dict()  # a foreign or newer report.json stops here, with its name
    widths = _widths_from_config(run_dir)
    return _published(page, lambda staged: render_run(d, staged, widths_config=widths))


def _published(page: Path, make) -> Path:
    """Render into a staging folder beside ``page``, then move the page and its PNGs in: a file there
    that fusegpt did not write (a user's own report.md) is refused before anything is replaced."""
    folder = OwnedFolder(page.parent, "report")
    folder.check([page.name])
    staging = staging_dir(page.parent)
    try:
        make(staging / page.name)
        folder.publish(staging)
    finally:
        remove_staging(staging)
    logger.info("wrote %s", page)
    return page


def read_json(path: Path) -> Any:
    """A JSON file, or a ValueError that names it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e}); was it cut off or edited by hand?") from None


def _widths_from_config(run_dir: Path) -> dict[str, Any] | None:
    cfg = run_dir / "config.json"
    if not cfg.is_file():
        return None
    from .checkpoint.width import WIDTH_KEY

    return read_json(cfg).get(WIDTH_KEY)


# ---------------------------------------------------------------- one run
def _score_matrix(step: dict[str, Any], n_blocks: int) -> list[list[float]]:
    rows = []
    for it in step["iterations"]:
        row = [math.nan] * n_blocks
        for k, v in it["scores"].items():
            if int(k) < n_blocks and v is not None:
                row[int(k)] = float(v)
        rows.append(row)
    return rows


def plot_scores(step: dict[str, Any], n_blocks: int, path: Path) -> Path:
    """Heatmap: iterations (rows) × original block index (columns); ✕ = the block removed then."""
    import numpy as np

    plt = _plt()
    m = np.array(_score_matrix(step, n_blocks), dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * n_blocks + 2), max(2.2, 0.42 * len(m) + 1.4)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    finite = m[np.isfinite(m)]
    norm = None
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:  # e.g. SLEB's loss without block 0
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, interpolation="nearest", norm=norm)
    for r, it in enumerate(step["iterations"]):
        for b in it["removed"]:
            ax.plot(b, r, marker="x", color="red", markersize=9, markeredgewidth=2)
    ax.set_xlabel("block (original index)")
    ax.set_ylabel("iteration")
    ax.set_xticks(range(n_blocks))
    ax.set_xticklabels([str(i) for i in range(n_blocks)], fontsize=7)
    ax.set_yticks(range(len(m)))
    ax.set_title(f"{step['method']}: importance per block at each iteration\n"
                 "(red x = removed then; grey = already removed or not a candidate)", fontsize=9)
    fig.colorbar(im, ax=ax, label="score (lower = removed first)" + (", log colour" if norm else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_removal(removed: list[int], n_blocks: int, path: Path) -> Path:
    """One cell per original block; removed blocks coloured and numbered by removal order."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * n_blocks + 1), 1.9))
    order = {b: i + 1 for i, b in enumerate(removed)}
    cmap = plt.get_cmap("autumn")
    for b in range(n_blocks):
        if b in order:
            color = cmap((order[b] - 1) / max(1, len(removed) - 1) * 0.8)
            ax.add_patch(plt.Rectangle((b, 0), 0.95, 1, color=color))
            ax.text(b + 0.47, 0.5, str(order[b]), ha="center", va="center", fontsize=8, fontweight="bold")
        else:
            ax.add_patch(plt.Rectangle((b, 0), 0.95, 1, color="#9ecae1"))
    ax.set_xlim(0, n_blocks)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([b + 0.47 for b in range(n_blocks)])
    ax.set_xticklabels([str(b) for b in range(n_blocks)], fontsize=7)
    ax.set_xlabel("block (original index); number = removal order, blue = kept")
    ax.set_title("which block went when", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fusion_groups(step: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups with per-epoch losses (``details.groups``, or the iterations' own fields)."""
    groups = step.get("details", {}).get("groups") or []
    if not groups:
        groups = [it for it in step["iterations"] if it.get("loss_per_epoch")]
    return [g for g in groups if g.get("loss_per_epoch")]


def plot_fusion(step: dict[str, Any], path: Path) -> Path:
    """Loss per epoch for each fused group (epoch 0 = before training): training (solid) and, when
    the run validated, held-in validation (dashed, the kept epoch ringed)."""
    plt = _plt()
    groups = fusion_groups(step)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("viridis")
    for i, g in enumerate(groups):
        ys = ([g["loss_start"]] if g.get("loss_start") is not None else []) + list(g["loss_per_epoch"])
        xs = list(range(len(ys))) if g.get("loss_start") is not None else list(range(1, len(ys) + 1))
        label = f"#{i + 1}: block {g.get('removed')} → {g.get('group')}"
        color = cmap(i / max(1, len(groups) - 1))
        ax.plot(xs, ys, marker="o", color=color, label=label)
        val = g.get("val_loss_per_epoch")
        if val:
            ax.plot(range(len(val)), val, marker="x", linestyle="--", color=color)
            if g.get("best_epoch") is not None:
                ax.plot([g["best_epoch"]], [val[g["best_epoch"]]], marker="o", markersize=11, fillstyle="none",
                        color=color)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before training; k = mean over epoch k)")
    ax.set_ylabel("group loss")
    if all(y > 0 for g in groups for y in [*g["loss_per_epoch"], *(g.get("val_loss_per_epoch") or [])]):
        ax.set_yscale("log")
    validated = any(g.get("val_loss_per_epoch") for g in groups)
    ax.set_title(f"{step['method']}: group loss per epoch\n(solid: training"
                 + ("; dashed: held-in validation; ring: the epoch kept)" if validated else ")"), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_widths(step: dict[str, Any] | None, widths_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per-layer ``{layer, heads: (before, after), ffn: (before, after)}`` from the report or the config."""
    layers = (step or {}).get("details", {}).get("layers") or []
    if layers and all("heads" in x and "ffn" in x for x in layers):
        return {"layer": [x["layer"] for x in layers], "heads": [x["heads"] for x in layers],
                "ffn": [x["ffn"] for x in layers], "kv_heads": [x.get("kv_heads") for x in layers]}
    if widths_config:
        h, f = widths_config.get("num_attention_heads"), widths_config.get("intermediate_size")
        if h and f:
            return {"layer": list(range(len(h))), "heads": [[None, x] for x in h], "ffn": [[None, x] for x in f],
                    "kv_heads": [[None, x] for x in widths_config.get("num_key_value_heads", [None] * len(h))]}
    return None


def plot_widths(w: dict[str, Any], path: Path, title: str = "") -> Path:
    """Bars: heads and FFN channels per layer after pruning, with the width before as an outline."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(w["layer"]) + 2), 5), sharex=True)
    x = list(range(len(w["layer"])))
    for ax, key, label in ((axes[0], "heads", "attention heads"), (axes[1], "ffn", "FFN channels")):
        before = [v[0] for v in w[key]]
        after = [v[1] for v in w[key]]
        if all(b is not None for b in before):
            ax.bar(x, before, color="none", edgecolor="grey", linestyle="--", label="before")
        ax.bar(x, after, color="#3182bd", label="after")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="lower right")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([str(i) for i in w["layer"]], fontsize=7)
    axes[1].set_xlabel("layer")
    axes[0].set_title(title or "per-layer widths", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(rows: list[list[str]], head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows]]


def render_run(d: dict[str, Any], page: Path, widths_config: dict[str, Any] | None = None) -> Path:
    """Markdown + PNGs for one run's report dict."""
    page.parent.mkdir(parents=True, exist_ok=True)
    stem = page.stem
    n_blocks = d.get("layers_before") or 1 + max([int(k) for s in d["steps"] for it in s["iterations"]
                                                  for k in it["scores"]] or [0])
    method = d.get("method") or "+".join(s["method"] for s in d["steps"])
    lines = [f"# {method} on {d.get('model') or 'model'}", ""]
    lines += _md_table([
        ["blocks", str(d.get("layers_before")), str(d.get("layers_after"))],
        ["parameters", f"{d.get('params_before', 0):,}", f"{d.get('params_after', 0):,}"],
        *[[f"ppl {src}", f"{v:.3f}", f"{d['perplexity'].get('after', {}).get(src, float('nan')):.3f}"]
          for src, v in d.get("perplexity", {}).get("before", {}).items()],
    ], ["", "before", "after"])
    lines += ["", f"Blocks removed (original indices, removal order): {d.get('removed')}; sorted: "
                  f"{d.get('removed_sorted')}. Seed {d.get('seed')}, wall time {d.get('wall_time_s', 0):.1f} s, "
                  f"peak memory {d.get('peak_memory_mb')} MB on {d.get('device')}.", ""]
    if d.get("eval_settings"):
        lines += [f"Perplexity settings: {json.dumps(d['eval_settings'])}.", ""]
    zs = (d.get("extra") or {}).get("zeroshot")
    if zs:
        tasks = zs.get("tasks", zs)
        lines += ["## Zero-shot (lm-evaluation-harness; *_proxy = offline proxy, not the published benchmark)", ""]
        rows = [[t, *[f"{r[m]:.4f}" if r.get(m) is not None else "–" for m in ("acc", "acc_norm")],
                 str(r.get("n", "–"))] for t, r in tasks.items()]
        lines += _md_table(rows, ["task", "acc", "acc_norm", "n"])
        lines.append("")
    for si, step in enumerate(d["steps"]):
        tag = f"{stem}_step{si}_{step['method']}"
        lines += [f"## Step {si + 1}: {step['method']}", "",
                  f"Settings: `{json.dumps(step.get('config', {}))}`", ""]
        if step["iterations"] and any(it["scores"] for it in step["iterations"]):
            png = plot_scores(step, n_blocks, page.parent / f"{tag}_scores.png")
            lines += [f"![importance scores]({png.name})", ""]
            rows = []
            for it in step["iterations"]:
                sc = it["scores"]
                low = sorted(sc.items(), key=lambda kv: kv[1])[:3]
                rows.append([str(it["iteration"]), str(it["removed"]),
                             ", ".join(f"{k}: {v:.4g}" for k, v in low)])
            lines += _md_table(rows, ["iteration", "removed", "three lowest scores (block: score)"]) + [""]
        if step.get("removed"):
            png = plot_removal(step["removed"], n_blocks, page.parent / f"{tag}_removal.png")
            lines += [f"![removal order]({png.name})", ""]
        if fusion_groups(step):
            png = plot_fusion(step, page.parent / f"{tag}_fusion.png")
            lines += [f"![fusion loss]({png.name})", ""]
            fb = step.get("details", {}).get("fallbacks")
            if fb:
                lines += [f"Groups that fell back to plain removal (diverged, or not better with "
                          f"revert_if_worse): {fb}.", ""]
        w = layer_widths(step, None)
        if w:
            png = plot_widths(w, page.parent / f"{tag}_widths.png", f"{step['method']}: per-layer widths")
            lines += [f"![per-layer widths]({png.name})", ""]
    if widths_config and not any(layer_widths(s, None) for s in d["steps"]):
        w = layer_widths(None, widths_config)
        if w:
            png = plot_widths(w, page.parent / f"{stem}_widths.png", "per-layer widths (from config.json)")
            lines += ["## Per-layer widths", "", f"![per-layer widths]({png.name})", ""]
    versions = d.get("versions") or {}
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    page.write_text("\n".join(lines))
    logger.info("wrote %s", page)
    return page


# ---------------------------------------------------------------- sweep
def plot_sweep(table: dict[str, Any], path: Path) -> Path:
    """Perplexity vs sparsity: one panel per data set, one line per method; dense at sparsity 0."""
    plt = _plt()
    dense = table["dense"].get("perplexity") or {}
    data = list(dense) or sorted({k for r in table["rows"] for k in r["perplexity"]})
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    markers, styles = "osD^vP*X", ["-", "--", "-.", ":"]
    for ax, src in zip(axes[0], data, strict=True):
        ys = []
        for i, m in enumerate(table["methods"]):
            pts = sorted((r["sparsity"], r["perplexity"][src]) for r in table["rows"]
                         if r["method"] == m and src in r["perplexity"])
            if dense.get(src) is not None:
                pts = [(0.0, dense[src]), *pts]
            if pts:
                ys += [p[1] for p in pts]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                        linestyle=styles[i % len(styles)], markersize=7 - i % 3, label=m)
        if dense.get(src) is not None:
            ax.axhline(dense[src], color="grey", linestyle=":", linewidth=1, label="dense")
        log = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 3
        if log:
            from matplotlib.ticker import LogLocator, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter() if max(ys) / min(ys) < 10 else "")
        ax.set_xlabel("sparsity (fraction of blocks removed)")
        ax.set_ylabel(f"perplexity ({Path(src).name}{', log scale' if log else ''})")
        ax.set_title(Path(src).name, fontsize=10)
        ax.set_xticks([0.0, *table["sparsities"]])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"perplexity vs sparsity: {table['dense'].get('model') or ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality_vs_speed(table: dict[str, Any], path: Path) -> Path:
    """Perplexity against the measured speed-up (the smaller of pp and tg), one panel per runtime; the
    Pareto front joined by a line."""
    from .sweep import quality_vs_speed

    plt = _plt()
    runtimes = sorted(table["speed"])
    src = next(iter(table["dense"].get("perplexity") or {}), None) or next(iter(table["rows"][0]["perplexity"]))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5.5 * len(runtimes), 4.2), squeeze=False)
    for ax, rt in zip(axes[0], runtimes, strict=True):
        pts = quality_vs_speed(table, rt, src)
        for p in pts:
            x = min(p["pp"], p["tg"])
            ax.scatter(x, p["ppl"], s=40, marker="*" if p["front"] else "o", zorder=3,
                       color="#d62728" if p["front"] else "#3182bd")
            ax.annotate(p["cell"], (x, p["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((min(p["pp"], p["tg"]), p["ppl"]) for p in pts if p["front"])
        if len(front) > 1:
            ax.plot([f[0] for f in front], [f[1] for f in front], color="#d62728", linewidth=1, zorder=2)
        ax.set_xlabel(f"measured speed-up vs dense in {rt} (min of pp, tg)")
        ax.set_ylabel(f"perplexity ({Path(src).name})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(rt, fontsize=10)
    fig.suptitle("quality vs speed (red stars: Pareto front)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_sweep_table(table: dict[str, Any], page: Path) -> Path:
    """Markdown + the perplexity plot for a sweep table (``sweep.json``)."""
    from .sweep import to_markdown

    png = plot_sweep(table, page.parent / f"{page.stem}_sweep_ppl.png")
    text = [f"# Sweep: {', '.join(table['methods'])} × sparsity {', '.join(f'{s:g}' for s in table['sparsities'])}",
            "", f"![perplexity vs sparsity]({png.name})", ""]
    if table.get("speed"):
        speed_png = plot_quality_vs_speed(table, page.parent / f"{page.stem}_quality_vs_speed.png")
        text += [f"![quality vs speed]({speed_png.name})", ""]
    text.append(to_markdown(table))
    page.write_text("\n".join(text))
    logger.info("wrote %s", page)
    return page
