#!/usr/bin/env bash
# Reliability benchmarks of `needle serve`, server and load generator on this machine; the tables
# go to results/reliability.md.
#   attack  a slow-header attack: 5,000 connections from 127.0.0.2 sending a header byte a second,
#           while 127.0.0.1 sends 1,000 recalls/s (5-second rows with the server's descriptors);
#   surge   capacity measured unpaced on a brute-force (exact) 200,000-item index, whose 2-3 ms
#           searches make the server CPU-bound, then half that rate with 10 s at 3x capacity;
#   soak    30 minutes at 1,000 recalls/s with 50 events/s, a reload every minute and a burst
#           of 200 malformed requests every minute (per-minute rows);
#   crash   `needle bench crash`: 100 kill -9 in each write path (events also into Redis with
#           appendfsync always, Redis killed too).
# Usage: bench/reliability.sh RUN [attack|surge|soak|crash ...]   (default: all four)
# RUN is any trained run with an index (e.g. runs/youtubednn after `needle index build`).
# Logs go to /tmp/needle-reliability.log.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bench/reliability.sh RUN [attack|surge|soak|crash ...]}
shift
STEPS=${*:-attack surge soak crash}
ADDR=127.0.0.1:8094
EXACT_INDEX=${EXACT_INDEX:-/tmp/needle-exact-200k.bin}

SERVER_OUT=/tmp/needle-reliability.out SERVER_LOG=/tmp/needle-reliability.log SERVER_LOG_LEVEL=error
# shellcheck source=bench/server.sh
. bench/server.sh
load() { # args: extra bench flags
    "$NEEDLE" bench serve --run "$RUN" --addr "$ADDR" --k 100 "$@"
}

for step in $STEPS; do
    case $step in
    attack)
        echo; echo "### slow-header attack: 5,000 connections from 127.0.0.2, 1,000 recalls/s from 127.0.0.1"; echo
        # The attack needs 5,000 descriptors in the load generator.
        ulimit -n 20000
        start_server --max-connections-per-client 256
        load --duration 60s --rate 1000 --concurrency 16 --window 5s --slow-connections 5000 --slow-byte-every 1s
        stop_server
        ;;
    surge)
        [ -f "$EXACT_INDEX" ] || "$NEEDLE" index build --run "$RUN" --kind exact --synthetic-items 200000 --out "$EXACT_INDEX"
        # Capacity: as fast as 16 connections go, with shedding off so every request is served.
        start_server --index "$EXACT_INDEX" --max-queue-wait 0
        echo; echo "### capacity: exact search over 200,000 items, unpaced, shedding off"; echo
        OUT=$(load --duration 20s --concurrency 16)
        echo "$OUT"
        CAP=$(echo "$OUT" | awk -F'|' 'NR==3 {gsub(/ /, "", $4); print $4}')
        stop_server
        HALF=$((CAP / 2))
        start_server --index "$EXACT_INDEX"
        echo; echo "### surge: $HALF recalls/s, 6x ($((HALF * 6))/s, 3x capacity) from 10 s to 20 s"; echo
        load --duration 30s --concurrency 64 --rate "$HALF" --surge-at 10s --surge-for 10s --surge-factor 6 --window 250ms
        stop_server
        ;;
    soak)
        echo; echo "### soak: 30 minutes, 1,000 recalls/s, 50 events/s, 30 reloads (one mid-minute), 30 bursts of 200 malformed requests"; echo
        start_server
        load --duration 30m --rate 1000 --concurrency 16 --events-rate 50 --reloads 30 --malformed 200 --malformed-bursts 30 --window 60s
        stop_server
        ;;
    crash)
        echo; echo "### crash consistency: 100 kill -9 per write path"; echo
        "$NEEDLE" bench crash --work "${CRASH_WORK:-/tmp/needle-crash}" --runs 100 --paths train,index,store,events,events-redis
        ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
