#!/usr/bin/env bash
# Set up (quick when already done) and serve the embedded default model on http://127.0.0.1:8000.
# Extra arguments go to `r1serve serve`, e.g. `bash scripts/serve.sh --model PATH.gguf --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/r1serve serve "$@"
