# Sourced by the load-test scripts (from the repository's root): builds needle, then starts and
# stops `needle serve` on $ADDR for $RUN; the server's stdout goes to $SERVER_OUT, its log to
# $SERVER_LOG, and $SERVER_LOG_LEVEL sets its verbosity.
NEEDLE=target/release/needle
cargo build --release -q -p needle

start_server() { # args: extra serve flags
    "$NEEDLE" serve --run "$RUN" --addr "$ADDR" --log-level "$SERVER_LOG_LEVEL" "$@" > "$SERVER_OUT" 2>> "$SERVER_LOG" &
    SERVER=$!
    for _ in $(seq 600); do grep -q listening "$SERVER_OUT" 2>/dev/null && return; sleep 0.1; done
    echo "server did not start" >&2; exit 1
}
stop_server() {
    kill -TERM "$SERVER"
    wait "$SERVER" && echo "(server exited cleanly on SIGTERM)"
    SERVER=
}
