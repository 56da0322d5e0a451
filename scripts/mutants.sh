#!/usr/bin/env bash
# Mutation testing of cotal-core with cargo-mutants, against the core's own tests, the simulator's
# and the wire-fixture tests of `tests/` (a mutant survives only if every one of them still
# passes). The real-broker tests of driver-tokio are not run: too slow per mutant.
#
#   scripts/mutants.sh            a sample: about one mutant in 90, picked by a hash of what the
#                                 mutant does (function name, mutation, ordinal), not of where it
#                                 is, so the same sample is drawn after code moves between files
#   scripts/mutants.sh --all      every mutant of the crate (hours on two cores)
#   scripts/mutants.sh --list     print the sample and exit
#
# Options: --one-in N (sample density, default 90), --out DIR (default target/mutants),
# --file GLOB (repeatable: only mutants in these files, e.g. 'core/src/agent/**'),
# --test-package P (repeatable: test with these packages only, instead of the three),
# --names FILE (only the mutants named in FILE, one per line as cargo-mutants prints them: a
# second stage for the survivors of a quick first one).
# Caution, seen in cargo-mutants 27's own logs (`cargo test --package=cotal-core` only): with
# `-p cotal-core` it runs the core's tests alone, whatever --test-package says. So every run is
# in effect a core-tests run, and each survivor must then be checked by hand against the
# simulator's and the wire-fixture tests (apply it, `cargo test -p cotal-driver-sim` and
# `cargo test -p cotal-tests`): the second stage of the session-9 figures was done that way.
# cargo-mutants 27 lets "delete field from struct expression" mutants through --re, so the
# sample also holds every such mutant of the files examined (18 in the whole core).
# Needs `cargo install --locked cargo-mutants` (not installed by CI; this is not a CI job).
# It mutates the working tree in place (faster: one incremental build dir) and restores every
# file after each mutant; do not edit the tree while it runs. The two simulator tests that prove
# the oracle catches a switched-off fix (they search up to 1,500 seeds each) are skipped: they
# test the oracle, and explore_500_seeds_with_every_fault still runs against every mutant.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
one_in=90
mode=sample
out="$root/target/mutants"
files=()
packages=()
names=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test-package) packages+=(--test-package "$2"); shift ;;
    --names) names="$2"; shift ;;
    --all) mode=all ;;
    --list) mode=list ;;
    --one-in) one_in="$2"; shift ;;
    --out) out="$2"; shift ;;
    --file) files+=(-f "$2"); shift ;;
    *) echo "mutants.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
# Every mutant meets the proptest cases the unmutated baseline met: a fixed seed, and no failure
# persisted into the regressions files (a random new find, or a mutant's own failure written
# there, would otherwise fail every later mutant and count it as caught).
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261207}" PROPTEST_DISABLE_FAILURE_PERSISTENCE=1
command -v cargo-mutants >/dev/null || { echo "mutants.sh: cargo install --locked cargo-mutants" >&2; exit 2; }

if [ ${#packages[@]} -eq 0 ]; then
  packages=(--test-package cotal-core --test-package cotal-driver-sim --test-package cotal-tests)
fi
run=(cargo mutants -p cotal-core --in-place "${packages[@]}"
  --output "$out" --minimum-test-timeout 240 "${files[@]}")
skip=(-- -- --skip g1_the_oracle_fails_when --skip issue9_the_oracle_fails_when)

if [ "$mode" = all ]; then
  exec "${run[@]}" "${skip[@]}"
fi
if [ -n "$names" ]; then
  regex="$(python3 -c 'import re,sys; print("^(" + "|".join(re.escape(l.strip()) for l in open(sys.argv[1]) if l.strip()) + ")$")' "$names")"
  exec "${run[@]}" --re "$regex" "${skip[@]}"
fi

list="$(mktemp)"
picked="$(mktemp)"
trap 'rm -f "$list" "$picked"' EXIT
cargo mutants -p cotal-core --list --json "${files[@]}" >"$list"
# The sample: a mutant is in when sha256(last segment of its function, its mutation without the
# location and the "in <function>" suffix, its ordinal among mutants with that same pair) is 0
# modulo N. Moving a method to another file or type keeps it in (or out of) the sample.
regex="$(python3 - "$list" "$one_in" "$picked" <<'PY'
import hashlib, json, re, sys
mutants = json.load(open(sys.argv[1]))
one_in = int(sys.argv[2])
seen = {}
names = []
for m in mutants:
    function = (m.get("function") or {}).get("function_name", "")
    what = re.sub(r"^[^:]+:\d+:\d+: ", "", m["name"])
    what = re.sub(r" in [^ ]+$", "", what)
    key = (function.split("::")[-1], what)
    seen[key] = seen.get(key, 0) + 1
    digest = hashlib.sha256(f"{key[0]}|{key[1]}|{seen[key]}".encode()).digest()
    if int.from_bytes(digest[:8], "big") % one_in == 0:
        names.append(m["name"])
open(sys.argv[3], "w").write("".join(n + "\n" for n in names))
print("^(" + "|".join(re.escape(n) for n in names) + ")$")
PY
)"
if [ "$mode" = list ]; then
  cat "$picked"
  echo "$(wc -l <"$picked") of $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$list") mutants" >&2
  exit 0
fi
echo "mutants.sh: $(wc -l <"$picked") mutants in the sample" >&2
exec "${run[@]}" --re "$regex" "${skip[@]}"
