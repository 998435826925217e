#!/usr/bin/env bash
# Set everything up, then prune the embedded SmolLM2-135M by 25% (8 of 30 blocks) with FuseGPT's
# cpu preset, evaluate perplexity before/after on wiki and news, print a table, save runs/demo.
#   METHOD=mi bash scripts/demo.sh        # a faster baseline (drop only)
#   bash scripts/demo.sh --resume         # continue an interrupted run
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
METHOD=${METHOD:-fusegpt}
# every method's cpu preset is sized for the embedded model on 2 cores (fusegpt prune --dry-run shows it)
exec .venv/bin/fusegpt prune --method "$METHOD" --sparsity 0.25 --preset cpu --max-tokens 16384 \
  --output runs/demo --overwrite "$@"
