#!/usr/bin/env bash
# Set everything up, then prune the embedded SmolLM2-135M by 25% and compare before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fusegpt prune --method "${METHOD:-mi}" --sparsity 0.25 --nsamples 8 --seqlen 256 \
  --output runs/demo --overwrite "$@"
