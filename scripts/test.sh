#!/usr/bin/env bash
# Set up (quick when already done) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-test-services.sh  # PostgreSQL for the accounts tests (Debian package)
exec .venv/bin/python -m pytest "$@"
