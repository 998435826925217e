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
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha1sum | cut -c1-12)
# AMX off: on machines whose CPU has AMX but whose kernel or sandbox does not give processes the tile
# state (seen here: a Xeon with amx_int8 under this workplace's sandbox), a -march=native build uses llama.cpp's
# AMX kernels and every quantised model (q8_0, q4_0, k-quants) segfaults on its first matmul. So on x86 the
# build names the CPU's features itself (GGML_NATIVE=OFF), every one -march=native would use but AMX.
ARCH=""
if [ "$(uname -m)" = x86_64 ] && grep -q '^flags' /proc/cpuinfo 2>/dev/null; then
  cpu=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  ARCH="-DGGML_NATIVE=OFF"
  for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$cpu" in *" ${pair%%:*} "*) ARCH="$ARCH -DGGML_${pair##*:}=ON";; *) ARCH="$ARCH -DGGML_${pair##*:}=OFF";; esac
  done
  for f in avx512cd avx512vl avx512dq avx512bw; do  # GGML_AVX512 uses all five AVX-512 foundation sets
    case "$cpu" in *" $f "*) ;; *) ARCH="${ARCH/-DGGML_AVX512=ON/-DGGML_AVX512=OFF}";; esac
  done
  ARCH="$ARCH -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
dir="${FUSEGPT_WHEEL_CACHE:-$HOME/.cache/fusegpt/wheels}/llama-cpp-python-$VERSION-$(uname -m)-$flags${ARCH:+-noamx}"
installed="$VENV/.fusegpt-llamacpp"  # which build this venv holds (a version check alone kept a broken build)
if [ -f "$installed" ] && [ "$(cat "$installed")" = "$dir" ] && \
   "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup_llamacpp: building llama-cpp-python $VERSION (llama.cpp from source; ~10 min on 2 cores, once)"
  mkdir -p "$dir.tmp"
  # only the shared library the Python package needs: no multimodal (mtmd), tools, examples, server or tests
  CMAKE_ARGS="$ARCH -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip --disable-pip-version-check -q wheel --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
"$PY" -m pip --disable-pip-version-check -q install --force-reinstall --no-deps "$dir"/llama_cpp_python-*.whl
"$PY" -m pip --disable-pip-version-check -q install "$dir"/llama_cpp_python-*.whl  # its dependencies, if missing
echo "$dir" > "$installed"
