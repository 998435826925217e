"""Is the up-front memory estimate an upper bound of the measured peak? One fresh process per method.

For each method on the embedded SmolLM2-135M-Instruct (CPU, fp32), runs ``fusegpt prune`` in a new
process with the given settings and measures that process's peak RSS (``wait4``), next to the
estimate ``fusegpt.estimate_memory`` gives for the same run. Prints a table, writes JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory_estimate.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# method -> extra CLI arguments (small settings: the point is the bound, not the result)
JOBS = {
    "shortgpt": [],
    "sleb": [],
    "mi": [],
    "slimgpt": [],
    "magnitude": [],
    "mi+ft": ["--set", "epochs=1", "--set", "ft_nsamples=16"],
    "fusegpt": ["--set", "epochs=1", "--set", "ft_nsamples=16"],
}
COMMON = ["--sparsity", "0.1", "--nsamples", "4", "--seqlen", "128", "--max-tokens", "4096"]


def run(method: str, extra: list[str], out: Path) -> tuple[int, float]:
    argv = [sys.executable, "-m", "fusegpt", "-q", "prune", "--method", method, *COMMON, *extra,
            "--output", str(out), "--overwrite"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed: {proc.stderr.read()[-2000:]}")
    return proc.returncode, usage.ru_maxrss * 1024 / 1e6  # MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(JOBS))
    ap.add_argument("--out", default="benchmarks/out/memory_estimate.json")
    ap.add_argument("--peaks", default=None, metavar="JSON",
                    help="reuse the measured peaks of an earlier --out (recompute only the estimates)")
    args = ap.parse_args()
    from fusegpt import EvalConfig, configs_for, estimate_memory
    from fusegpt.cli.common import settings_from
    from fusegpt.loading import model_config

    config = model_config(None)
    measured = {r["method"]: r["peak_mb"] for r in json.loads(Path(args.peaks).read_text())["rows"]} \
        if args.peaks else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            extra = JOBS[m]
            settings = settings_from([extra[i + 1] for i in range(0, len(extra), 2)])
            cfgs = configs_for(m, 0.1, nsamples=4, seqlen=128, **settings)
            est = estimate_memory(config, cfgs, eval_config=EvalConfig(seqlen=512, max_tokens=4096))
            peak = measured[m] if m in measured else run(m, extra, Path(tmp) / m)[1]
            rows.append({"method": m, "estimate_mb": round(est.total / 1e6), "peak_mb": round(peak),
                         "peak_step": est.peak_step, "bound": est.total / 1e6 >= peak})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| method | estimate MB | measured peak RSS MB | estimate / peak | peak step (estimate) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['estimate_mb']:,} | {r['peak_mb']:,} | {r['estimate_mb'] / r['peak_mb']:.2f} "
                     f"| {r['peak_step']} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"common": COMMON, "jobs": JOBS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
