#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS_PER_TARGET seconds each (default 60), one
# after another, starting from the committed seeds (fuzz/corpus/<target>/seed-*) plus what
# earlier runs found (kept in a scratch corpus under $CARGO_TARGET_DIR, not in the clone).
# Exits non-zero on any crash, timeout (an input taking over 10 s), leak or out-of-memory;
# prints each target's executions. Needs the nightly toolchain (`cargo +nightly`); installs
# cargo-fuzz into ~/.cargo/bin if it is missing.
#   tests/fuzz/run.sh [SECONDS_PER_TARGET]
set -euo pipefail

PER_TARGET="${1:-60}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target-fuzz}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (cargo +nightly); cargo-fuzz needs one" >&2
    exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd "$ROOT/fuzz"
# -a: debug assertions, so an integer overflow is a crash too.
cargo +nightly fuzz build -a

dict_for() {
    case "$1" in
        snapshot_read | atomic_write | watch) echo dict/protobuf.dict ;;
        metadata | headers | key_codec | v8sum) echo "dict/$1.dict" ;;
        *) echo "" ;;
    esac
}

failed=()
printf '%-15s %12s %s\n' target executions result
for t in $(cargo +nightly fuzz list); do
    scratch="$CARGO_TARGET_DIR/fuzz-corpus/$t"
    log="$CARGO_TARGET_DIR/fuzz-logs/$t.log"
    mkdir -p "$scratch" "$(dirname "$log")"
    args=(-max_total_time="$PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    dict="$(dict_for "$t")"
    [ -n "$dict" ] && args+=(-dict="$dict")
    # New inputs go to the first corpus directory: the scratch one.
    if cargo +nightly fuzz run -a "$t" "$scratch" "corpus/$t" -- "${args[@]}" >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (log: $log; reproducer: fuzz/artifacts/$t/)"
        failed+=("$t")
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
    printf '%-15s %12s %s\n' "$t" "${runs:-?}" "$result"
    if [ "$result" != ok ]; then tail -n 30 "$log" >&2; fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failures in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: all targets ran ${PER_TARGET}s without a crash, timeout or leak"
