"""Compose the tables of ``benchmarks/eval_benchmark.sh``'s output folder as Markdown.

    python benchmarks/eval_results_md.py runs/eval-bench > /tmp/tables.md

Copies the sweep's plot to ``benchmarks/figures/`` and prints: the sweep table, the proxies of the
dense and the pruned model (with standard errors and chance), and the speed table.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fusegpt.eval.speed import bench_to_markdown
from fusegpt.sweep import to_markdown


def proxies_table(files: dict[str, Path]) -> str:
    lines = ["| model | wiki_lastword_proxy acc | last-word perplexity | news_continuation_proxy acc | "
             "news_continuation_proxy acc_norm | n |", "|---|---|---|---|---|---|"]
    for name, f in files.items():
        if not f.is_file() or not f.read_text().strip():
            continue
        z = json.loads(f.read_text().strip().splitlines()[-1])["zeroshot"]
        lw, nc = z["tasks"]["wiki_lastword_proxy"], z["tasks"]["news_continuation_proxy"]

        def pm(r, m):
            return f"{r[m]:.3f} ± {r[m + '_stderr']:.3f}"

        lines.append(f"| {name} | {pm(lw, 'acc')} | {lw['perplexity']:.2f} | {pm(nc, 'acc')} | {pm(nc, 'acc_norm')} | "
                     f"{lw['n']} / {nc['n']} |")
    lines.append("| chance | ≈ 0 (open vocabulary) | | 0.250 | 0.250 | |")
    return "\n".join(lines) + "\n"


def main(out: str) -> None:
    root = Path(out)
    figs = Path(__file__).parent / "figures"
    figs.mkdir(exist_ok=True)
    sweep = root / "sweep"
    if (sweep / "report_sweep_ppl.png").is_file():
        shutil.copy(sweep / "report_sweep_ppl.png", figs / "eval_sweep_ppl.png")
    print("## Sweep\n")
    print(to_markdown(json.loads((sweep / "sweep.json").read_text())))
    print("## Offline zero-shot proxies\n")
    print(proxies_table({"dense": root / "proxies_dense.json", "mi-0.25": root / "proxies_mi-0.25.json"}))
    if (root / "bench.json").is_file():
        print("## Speed and memory\n")
        print(bench_to_markdown(json.loads((root / "bench.json").read_text())))
    if (root / "timeline.txt").is_file():
        print("Timeline (UTC):\n\n```\n" + (root / "timeline.txt").read_text() + "```")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/eval-bench")
