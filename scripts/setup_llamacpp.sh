#!/usr/bin/env bash
# Install llama-cpp-python (the real llama.cpp runtime) into the venv, for the GGUF tests and benchmarks.
# It builds llama.cpp from source (about ten minutes on 2 cores) once per machine: the wheel is cached
# under $FUSEGPT_WHEEL_CACHE (default ~/.cache/fusegpt/wheels), keyed by version and CPU flags (the
# build is -march=native), so a rerun on the same machine installs it in seconds.
# FUSEGPT_NO_LLAMACPP=1 skips it (the llama.cpp tests are then skipped, and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${FUSEGPT_NO_LLAMACPP:-0}" = "1" ] && { echo "setup_llamacpp: skipped (FUSEGPT_NO_LLAMACPP=1)"; exit 0; }
VENV=${FUSEGPT_VENV:-.venv}
PY="$VENV/bin/python"
VERSION=0.3.36  # the llama.cpp whose pre-tokenizer table src/fusegpt/checkpoint/gguf/pretokenizers.py holds
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha1sum | cut -c1-12)
dir="${FUSEGPT_WHEEL_CACHE:-$HOME/.cache/fusegpt/wheels}/llama-cpp-python-$VERSION-$(uname -m)-$flags"
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup_llamacpp: building llama-cpp-python $VERSION (llama.cpp from source; ~10 min on 2 cores, once)"
  mkdir -p "$dir.tmp"
  # only the shared library the Python package needs: no multimodal (mtmd), tools, examples, server or tests
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip --disable-pip-version-check -q wheel --no-deps "llama-cpp-python==$VERSION" -w "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
"$PY" -m pip --disable-pip-version-check -q install "$dir"/llama_cpp_python-*.whl
