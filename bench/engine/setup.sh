#!/usr/bin/env bash
# Set-up for the engine benchmark (bench/engine/run.py); quick when run again.
#
#   1. llama.cpp's llama-server, llama-bench and llama-batched-bench, built with CMake from the
#      vendor/llama.cpp tree of the llama-cpp-python sdist that r1serve embeds, with the same
#      SIMD flags as r1serve's own build (scripts/llama-build-flags.sh): GGML_NATIVE=OFF, AMX off.
#      Kept in  <cache>/bench/llama.cpp-<key>/  where <key> hashes the version, flags and arch.
#   2. A separate venv, <cache>/bench/lcpp-venv, with llama-cpp-python's own server
#      (`python -m llama_cpp.server`), installed from r1serve's cached wheel (built by
#      scripts/setup.sh with the same flags), plus the wheel's [server] extras.
#
# Prints shell assignments (LLAMA_BIN_DIR=..., LCPP_PYTHON=...) on stdout at the end; logs on stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

LLAMA_VERSION=0.3.36
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/r1serve
BENCH_CACHE="$CACHE/bench"
JOBS=${JOBS:-2}
say() { printf '\033[1m[bench-setup]\033[0m %s\n' "$*" >&2; }
mkdir -p "$BENCH_CACHE"

# --- 1. llama.cpp tools --------------------------------------------------------------------------
BASE_FLAGS=$(bash scripts/llama-build-flags.sh)
# The project's flags switch tools and the server off (r1serve needs only the libraries); the
# benchmark needs them back. Later -D options override earlier ones. No network at build time:
# no prebuilt web UI download (the server runs without its UI), no curl.
TOOL_FLAGS="-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON"
TOOL_FLAGS+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF"
TOOL_FLAGS+=" -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF"
FLAGS="$BASE_FLAGS $TOOL_FLAGS"
KEY=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$FLAGS" "$(uname -m)" | sha256sum | cut -c1-16)
BUILD_ROOT="$BENCH_CACHE/llama.cpp-$KEY"
BIN="$BUILD_ROOT/build/bin"
TARGETS=(llama-server llama-bench llama-batched-bench)

built=1
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || built=0; done
if [ "$built" = 1 ] && [ -f "$BUILD_ROOT/.done" ]; then
  say "llama.cpp tools already built in $BIN"
else
  mkdir -p "$BUILD_ROOT"
  SDIST="$BENCH_CACHE/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    say "downloading the llama-cpp-python $LLAMA_VERSION sdist"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
    mv "$tmp"/llama_cpp_python-"$LLAMA_VERSION".tar.gz "$SDIST"
    rm -rf "$tmp"
  fi
  SRC="$BUILD_ROOT/src"
  if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar xzf "$SDIST" -C "$SRC" --strip-components=1
  fi
  printf '%s\n' "$FLAGS" > "$BUILD_ROOT/cmake-flags.txt"
  sha256sum "$SDIST" > "$BUILD_ROOT/sdist.sha256"
  say "configuring llama.cpp (vendored in llama-cpp-python $LLAMA_VERSION)"
  say "flags: $FLAGS"
  # shellcheck disable=SC2086
  cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD_ROOT/build" $FLAGS >&2
  say "building ${TARGETS[*]} with -j$JOBS (about 10 minutes on 2 cores)"
  cmake --build "$BUILD_ROOT/build" --config Release --target "${TARGETS[@]}" -j"$JOBS" >&2
  touch "$BUILD_ROOT/.done"
fi

# --- 2. llama-cpp-python's own server, in its own venv --------------------------------------------
LCPP_VENV="$BENCH_CACHE/lcpp-venv"
WHEEL=$(ls "$CACHE"/wheels/llama-cpp-python-"$LLAMA_VERSION"-*/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
  say "no cached llama-cpp-python wheel under $CACHE/wheels: run scripts/setup.sh first"
  exit 1
fi
BASE_PY=$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null || echo python3)
STAMP="$LCPP_VENV/.bench-setup"
WANT=$(sha256sum "$WHEEL" | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "creating $LCPP_VENV with $WHEEL [server]"
  [ -x "$LCPP_VENV/bin/python" ] || "$BASE_PY" -m venv "$LCPP_VENV"
  "$LCPP_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$LCPP_VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
  # the wheel's own [server] extra (uvicorn, fastapi, sse-starlette, starlette-context,
  # pydantic-settings, PyYAML) and its core deps; the wheel itself is not rebuilt
  "$LCPP_VENV/bin/python" -m pip install --quiet "$WHEEL[server]"
  echo "$WANT" > "$STAMP"
fi
"$LCPP_VENV/bin/python" -c 'import llama_cpp.server' >&2

echo "LLAMA_BIN_DIR=$BIN"
echo "LCPP_PYTHON=$LCPP_VENV/bin/python"
