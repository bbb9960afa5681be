#!/usr/bin/env bash
# A fuzz campaign over needle's loaders and on-disk formats (targets in fuzz/, entry points in
# crates/needle-fuzz).
#
#   bench/fuzz.sh [-j JOBS] [--runs N] [SECONDS] [TARGET...]
#
# Each target runs until SECONDS have passed (default 600) or about N inputs were tried (default:
# no limit; checked between libFuzzer's fork jobs), whichever comes first, starting from
# fuzz/seeds/TARGET and growing fuzz/corpus/TARGET. JOBS targets run at once (default 1; each
# takes one core). Crash, timeout and out-of-memory inputs are copied to fuzz/regressions/TARGET/,
# where `cargo test -p needle-fuzz` replays them; the script exits 1 when any was found (the
# "crashes" column counts all three). No sanitizer is used: needle is safe Rust, so the findings
# are panics, aborts, hangs and runaway allocations. Logs: fuzz/artifacts/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(csv_log parquet_log movielens dataset checkpoint index store_records request_json config_toml)
JOBS=1
RUNS=-1
SECONDS_PER_TARGET=600
TARGETS=()
POSITIONAL=0

usage() {
    sed -n '4,13p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        -j) JOBS="${2:?-j needs a number}"; shift 2 ;;
        -j*) JOBS="${1#-j}"; shift ;;
        --runs) RUNS="${2:?--runs needs a number}"; shift 2 ;;
        --runs=*) RUNS="${1#--runs=}"; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *)
            # A number in first place is the time budget; everything else names targets.
            if [ "$POSITIONAL" -eq 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
                SECONDS_PER_TARGET="$1"
            else
                TARGETS+=("$1")
            fi
            POSITIONAL=$((POSITIONAL + 1))
            shift ;;
    esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "unknown target $t (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "-j needs a positive number, got $JOBS" >&2; exit 2; }
[[ "$RUNS" =~ ^-?[0-9]+$ ]] || { echo "--runs needs a number, got $RUNS" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# libFuzzer's instrumentation flags are unstable options; the stable toolchain accepts them
# under RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
echo "building the fuzz targets"
cargo fuzz build -s none

STAMP="$(date +%Y%m%d-%H%M%S)"
RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT

# One campaign: fuzz, then record seconds, executions, corpus size and findings. libFuzzer runs
# in fork mode so that a crash, timeout or out-of-memory input is recorded and the campaign
# goes on instead of ending at the first one.
campaign() {
    local t="$1"
    local corpus="$PWD/fuzz/corpus/$t" art="$PWD/fuzz/artifacts/$t/$STAMP"
    local log="fuzz/artifacts/logs/$t-$STAMP.log"
    mkdir -p "$corpus" "$art" "fuzz/artifacts/logs" "fuzz/regressions/$t"
    local start end status=0
    start=$(date +%s)
    cargo fuzz run -s none "$t" "$corpus" "$PWD/fuzz/seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -runs="$RUNS" -rss_limit_mb=2048 -timeout=10 \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -print_final_stats=1 -artifact_prefix="$art/" >"$log" 2>&1 || status=$?
    end=$(date +%s)
    local execs secs found=0 f
    # Fork mode reports progress as "#EXECUTIONS: cov: ..." lines, the last one the total, and
    # ends with "exiting: CODE time: SECONDSs" (fuzzing time, without building or waiting).
    execs=$(grep -oE '^#[0-9]+:' "$log" | tail -1 | tr -d '#:' || true)
    secs=$(grep -oE 'exiting: [0-9]+ time: [0-9]+s' "$log" | tail -1 | grep -oE '[0-9]+s$' | tr -d s || true)
    for f in "$art"/crash-* "$art"/timeout-* "$art"/oom-* "$art"/leak-*; do
        [ -f "$f" ] || continue
        cp "$f" "fuzz/regressions/$t/"
        found=$((found + 1))
    done
    # A run that failed without leaving an input (a build error, a crash while loading the
    # corpus) is a finding too: the log says what happened.
    if [ "$status" -ne 0 ] && [ "$found" -eq 0 ]; then
        found="error"
    fi
    local size
    size=$(find "$corpus" -maxdepth 1 -type f | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${secs:-$((end - start))}" "${execs:-?}" "$size" "$found" "$log" \
        >"$RESULTS/$t"
    echo "$t: done ($found found, log $log)"
}

echo "fuzzing ${TARGETS[*]} for ${SECONDS_PER_TARGET}s each (runs: $RUNS), $JOBS at a time"
running=0
for t in "${TARGETS[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    campaign "$t" &
    running=$((running + 1))
done
wait || true

failed=0
echo
printf '%-14s %8s %12s %8s %8s\n' target seconds executions corpus crashes
for t in "${TARGETS[@]}"; do
    if [ ! -f "$RESULTS/$t" ]; then
        printf '%-14s %8s %12s %8s %8s\n' "$t" - - - error
        failed=1
        continue
    fi
    IFS=$'\t' read -r name secs execs size found log <"$RESULTS/$t"
    printf '%-14s %8s %12s %8s %8s\n' "$name" "$secs" "$execs" "$size" "$found"
    if [ "$found" != 0 ]; then
        failed=1
        echo "    see $log; inputs copied to fuzz/regressions/$name/" >&2
    fi
done
exit "$failed"
