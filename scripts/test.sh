#!/usr/bin/env bash
# Set everything up (the full set-up: lm-eval, plots, dev tools, llama.cpp), then run ruff, the type
# checker and the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
FUSEGPT_SETUP=full bash scripts/setup.sh
# Tiny test models are overhead-bound: one OpenMP thread that sleeps while waiting is faster, and
# keeps the suite fast when other jobs share the cores (two spinning threads ran it 5-50x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m mypy   # the files and settings are in pyproject.toml [tool.mypy]
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
