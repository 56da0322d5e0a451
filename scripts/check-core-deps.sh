#!/usr/bin/env bash
# Fails unless cotal-core's normal dependencies are exactly serde, serde_json and bytes (plus
# what those pull in themselves), and the core source stays sans-IO.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
direct=$(cargo tree -p cotal-core -e normal --depth 1 --prefix none --format '{p}' | awk 'NR>1 {print $1}' | sort -u | tr '\n' ' ')
expected="bytes serde serde_json "
if [ "$direct" != "$expected" ]; then
  echo "cotal-core direct dependencies are '$direct', expected '$expected'" >&2
  exit 1
fi
if cargo tree -p cotal-core -e normal --prefix none --format '{p}' | grep -E '^(tokio|async-nats|rand|getrandom|futures)' ; then
  echo "cotal-core pulls in a runtime or RNG crate" >&2
  exit 1
fi
hits=$(grep -rnE 'Instant::now|SystemTime|std::net|std::thread|tokio|async fn|\.await|rand::|getrandom|std::fs|std::process|std::env::var' core/src | grep -vE '^\S+:[0-9]+:\s*//' || true)
if [ -n "$hits" ]; then
  echo "cotal-core must stay sans-IO; these lines look like they break that:" >&2
  echo "$hits" >&2
  exit 1
fi
echo "ok: cotal-core depends on: $direct"
