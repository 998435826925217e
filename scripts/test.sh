#!/usr/bin/env bash
# Set everything up, then run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
