#!/usr/bin/env bash
# Serving beyond one model and one machine, server and load generator on this machine:
#   1. two versions side by side at 90/10 under 2,000 requests/s, with 10 rollbacks (one every
#      2.5 s) during the run;
#   2. one server on a 3-master Redis Cluster (with one replica each) against one server on a
#      single Redis, 2,000 requests/s each;
#   3. the cluster run again with per-second rows, one master killed (SIGKILL) 10 s in.
# Usage: NEEDLE_DATA_DIR=... bench/scaleout.sh [RUN] [CANARY_RUN] [DURATION]
#        (defaults: runs/youtubednn runs/youtubednn-reg 30s); ONLY=cluster runs parts 2 and 3
#        on the cluster alone.
# Needs redis-server and redis-cli (Debian: apt-get install redis-server). Logs: /tmp/needle-scaleout.log.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/youtubednn}
CANARY=${2:-runs/youtubednn-reg}
DUR=${3:-30s}
ADDR=127.0.0.1:8090
TOKEN=scaleout-bench-token-0123456789
WORK=$(mktemp -d /tmp/needle-scaleout.XXXXXX)
echo "$TOKEN" > "$WORK/token"
export NEEDLE_ADMIN_TOKEN=$TOKEN

cleanup() {
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

SERVER_OUT="$WORK/serve.out" SERVER_LOG=/tmp/needle-scaleout.log SERVER_LOG_LEVEL=warn
# shellcheck source=bench/server.sh
. bench/server.sh
load() { # args: title, extra bench flags
    local title=$1; shift
    echo; echo "### $title"; echo
    "$NEEDLE" bench serve --run "$RUN" --addr "$ADDR" --duration "$DUR" --concurrency 16 --k 100 --rate 2000 "$@"
}
admin() { # args: method, path
    curl -s -X "$1" "http://$ADDR$2" -H "authorization: Bearer $TOKEN"
}

redis_node() { # args: port, extra flags
    local port=$1; shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir "$WORK" \
        --pidfile "$WORK/$port.pid" --logfile "$WORK/$port.log" "$@" > /dev/null
    for _ in $(seq 50); do redis-cli -p "$port" ping > /dev/null 2>&1 && return; sleep 0.1; done
}

if [ "${ONLY:-}" != cluster ]; then
# 1. Versions side by side, rolled back and forth under load.
name=$(basename "$RUN")
start_server --add-version "canary=$CANARY" --traffic "$name=90,canary=10"
( sleep 3; for i in $(seq 10); do admin POST /admin/rollback > "$WORK/rollback-$i.json"; sleep 2.5; done ) &
ROLLER=$!
load "two versions, $name=90 and canary=10 ($(basename "$CANARY")), 10 rollbacks during the run"
wait "$ROLLER"
echo; echo "rollbacks answered:"; for i in $(seq 10); do cat "$WORK/rollback-$i.json"; echo; done
echo; echo "recalls by version:"; curl -s "http://$ADDR/metrics" | grep '^needle_version_recalls_total'
stop_server

# 2. One Redis against a Redis Cluster.
redis_node 6390
"$NEEDLE" store load --run "$RUN" --store redis://127.0.0.1:6390
start_server --store redis://127.0.0.1:6390
load "one Redis 7.0.15"
stop_server
fi

PORTS="7481 7482 7483 7484 7485 7486"
for p in $PORTS; do
    redis_node "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 1000
done
# shellcheck disable=SC2046
redis-cli --cluster create $(printf '127.0.0.1:%s ' $PORTS) --cluster-replicas 1 --cluster-yes > /dev/null
for p in $PORTS; do
    for _ in $(seq 100); do
        info=$(redis-cli -p "$p" info replication)
        if redis-cli -p "$p" cluster info | grep -q cluster_state:ok \
            && { ! grep -q role:slave <<< "$info" || grep -q master_link_status:up <<< "$info"; }; then break; fi
        sleep 0.1
    done
done
CLUSTER=redis+cluster://127.0.0.1:7481,127.0.0.1:7482,127.0.0.1:7483
"$NEEDLE" store load --run "$RUN" --store "$CLUSTER"
for p in 7481 7482 7483; do
    n=$(redis-cli -p "$p" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
    keys=$(redis-cli -p "$p" dbsize)
    echo "master $p: $keys keys, used_memory $n bytes"
done
start_server --store "$CLUSTER"
load "Redis Cluster, 3 masters + 3 replicas"

# 3. A master killed mid-run.
victim=$(for p in 7481 7482 7483; do redis-cli -p "$p" role | head -1 | grep -q master && echo "$p" && break; done)
( sleep 10; kill -9 "$(cat "$WORK/$victim.pid")"; echo "killed master $victim at $(date +%T.%N)" >&2 ) &
load "Redis Cluster, master $victim killed 10 s in, per second" --window 1s
echo; echo "cluster after:"; redis-cli -p 7482 cluster nodes | awk '{print $2, $3}'
stop_server
