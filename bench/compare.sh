#!/usr/bin/env bash
# Two builds of needle side by side on the same machine: `needle bench train` (ML-1M) and
# `needle bench serve` (a served run at full speed, then at a fixed rate), alternating
# A, B, A, B, … so that drift of the machine lands on both; prints every run's lines and leaves
# the medians to bench/compare_medians.py.
# Usage: bench/compare.sh A_BINARY B_BINARY RUN DATA_DIR [ROUNDS]
#   RUN must be readable by both builds (a run saved by the older one is).
set -euo pipefail
A=$1; B=$2; RUN=$3; DATA=$4; ROUNDS=${5:-3}
ADDR=127.0.0.1:8093
serve_bench() { # binary, label
    "$1" --threads 2 serve --run "$RUN" --addr "$ADDR" --log-level warn --data-dir "$DATA" > /tmp/compare-serve.out 2>/tmp/compare-serve.err &
    local pid=$!
    for _ in $(seq 600); do grep -q listening /tmp/compare-serve.out 2>/dev/null && break; sleep 0.1; done
    echo "== $2 serve max"
    "$1" bench serve --run "$RUN" --addr "$ADDR" --duration 20s --concurrency 16 --k 100 2>&1 | grep -E '^\|' | tail -1
    echo "== $2 serve 2000"
    "$1" bench serve --run "$RUN" --addr "$ADDR" --duration 20s --concurrency 16 --k 100 --rate 2000 2>&1 | grep -E '^\|' | tail -1
    kill -TERM "$pid"; wait "$pid" || true
}
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        echo "== $side train (round $r)"
        "$bin" --threads 2 bench train --data-dir "$DATA" 2>&1 | grep -E '^\|' || true
        serve_bench "$bin" "$side"
    done
done
