#!/usr/bin/env bash
# Runs cargo-fuzz targets for a bounded time each, CI-friendly: every target starts from the
# committed seeds (fuzz/seeds/<target>/) and grows the local corpus (fuzz/corpus/<target>/);
# a crash fails the run and leaves its input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 # every target, 30 s each
#   scripts/fuzz.sh 300 control_gate reader_entry   # chosen targets, 5 min each
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer). With a nightly toolchain installed it is
# used; otherwise the stable compiler runs with RUSTC_BOOTSTRAP=1 (the same thing CI does on a
# stable-only image). Without cargo-fuzz at all, `cargo test -p cotal-tests --test fuzz_corpus`
# still replays every seed and corpus file through the same entry points on stable.
#
# After a run, minimise and keep what was found:
#   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz cmin <target> corpus/<target>)
set -euo pipefail
secs=${1:-30}
shift || true
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== fuzz $t for ${secs}s"
    cargo "${toolchain[@]}" fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=1100000 -rss_limit_mb=2048 -print_final_stats=1
done
