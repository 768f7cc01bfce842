#!/usr/bin/env bash
# Set up (quick when already done) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
R1SERVE_EXTRAS=test,ray bash scripts/setup.sh  # Ray: the deployments' Ray executor tests start a local head
bash scripts/install-test-services.sh  # PostgreSQL for the accounts tests (Debian package)
# Lint and types first (configured in pyproject.toml): seconds, and a failure names the line.
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
