#!/usr/bin/env bash
# Prints the CMAKE_ARGS for building llama-cpp-python on this CPU.
#
# Why not the sdist default (GGML_NATIVE=ON): on these x86 guests -march=native enables AMX, and
# that build crashed (SIGSEGV in the first llama_decode). So: no native, no AMX, and every SIMD
# extension this CPU really reports switched on by name, so the build is as fast as a native one.
# Tests, examples, tools and the server are not built: r1serve only needs the libraries.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
args+=" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
            avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  cpu=${pair%%:*}; ggml=${pair#*:}
  if has "$cpu"; then args+=" -DGGML_${ggml}=ON"; else args+=" -DGGML_${ggml}=OFF"; fi
done
echo "$args"
