#!/usr/bin/env bash
# Services the tests start themselves: PostgreSQL (Debian's postgresql package) for the accounts tests,
# Chromium (Debian's chromium) for the console tests.
# Idempotent and quick when already installed.
set -euo pipefail
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null; }
    # The Debian package starts a cluster of its own; the tests start their own servers instead.
    if command -v pg_ctlcluster >/dev/null; then
        for c in /etc/postgresql/*/main; do
            [ -d "$c" ] && $SUDO pg_ctlcluster "$(basename "$(dirname "$c")")" main stop >/dev/null 2>&1 || true
        done
    fi
fi
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { echo "postgresql did not install" >&2; exit 1; }

# Chromium (Debian's package) for the console's browser tests; Playwright drives it, downloading nothing.
if ! command -v chromium >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }
fi
command -v chromium >/dev/null || { echo "chromium did not install" >&2; exit 1; }
