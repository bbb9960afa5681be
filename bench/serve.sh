#!/usr/bin/env bash
# Load tests of `needle serve` on a trained run, server and load generator on this machine:
#   1. embedded store, the run's own index, as fast as possible and at 2,000 requests/s;
#   2. the same with 5 reloads and a burst of 1,000 malformed requests during the run;
#   3. Redis store (a private redis-server on port 6390), both rates;
#   4. a 1,000,000-item HNSW index (the run's items plus synthetic ones), both rates.
# Usage: NEEDLE_DATA_DIR=... bench/serve.sh [RUN] [DURATION]     (defaults: runs/youtubednn 30s)
# The servers' logs go to /tmp/needle-serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/youtubednn}
DUR=${2:-30s}
ADDR=127.0.0.1:8090
BIG_INDEX=${BIG_INDEX:-/tmp/needle-serve-1m.bin}

SERVER_OUT=/tmp/needle-serve.out SERVER_LOG=/tmp/needle-serve.log SERVER_LOG_LEVEL=warn
# shellcheck source=bench/server.sh
. bench/server.sh
load() { # args: title, extra bench flags
    local title=$1; shift
    echo; echo "### $title"; echo
    "$NEEDLE" bench serve --run "$RUN" --addr "$ADDR" --duration "$DUR" --concurrency 16 --k 100 "$@"
}

start_server
load "embedded store, $(basename "$RUN") index, k=100, max rate"
load "embedded store, $(basename "$RUN") index, k=100, 2,000 requests/s" --rate 2000
load "embedded store, 2,000 requests/s, 5 reloads and 1,000 malformed requests" --rate 2000 --reloads 5 --malformed 1000
stop_server

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir /tmp \
    --pidfile /tmp/needle-bench-redis.pid > /dev/null
trap 'kill "$(cat /tmp/needle-bench-redis.pid)" 2>/dev/null || true' EXIT
sleep 0.5
"$NEEDLE" store load --run "$RUN" --store redis://127.0.0.1:6390
start_server --store redis://127.0.0.1:6390
load "Redis store, k=100, max rate"
load "Redis store, k=100, 2,000 requests/s" --rate 2000
stop_server

if [ ! -f "$BIG_INDEX" ]; then
    "$NEEDLE" index build --run "$RUN" --synthetic-items 1000000 --out "$BIG_INDEX"
fi
start_server --index "$BIG_INDEX"
load "embedded store, 1,000,000-item HNSW index, k=100, max rate"
load "embedded store, 1,000,000-item HNSW index, k=100, 2,000 requests/s" --rate 2000
stop_server
