# Shared settings of bench/dynamo/*.sh (sourced). Every value can be set from the environment.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN=${KILN_DYNAMO_RUN:-/tmp/kiln-dynamo-run}            # pids, logs, etcd and NATS data
VENV=${KILN_DYNAMO_VENV:-$HOME/.cache/kiln/dynamo-venv}  # python with ai-dynamo (the frontend)
WORKER=${KILN_DYNAMO_BIN:-$ROOT/dynamo/target/release/kiln-dynamo}
HTTP_PORT=${KILN_DYNAMO_HTTP_PORT:-8000}                 # the frontend's OpenAI API
METRICS_BASE=${KILN_DYNAMO_METRICS_BASE:-9100}           # worker i serves /metrics on METRICS_BASE+i
PARALLEL=${KILN_DYNAMO_PARALLEL:-16}                     # sequences per worker
CTX=${KILN_DYNAMO_CTX:-1024}                             # context per sequence
BACKEND=${KILN_DYNAMO_BACKEND:-auto}
ROUTER_MODE=${KILN_DYNAMO_ROUTER_MODE:-kv}
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
NATS=${NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}
export ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-http://127.0.0.1:2379}
export NATS_SERVER=${NATS_SERVER:-nats://127.0.0.1:4222}
# Discovery in etcd, KV events and other events over NATS, requests over TCP.
export DYN_DISCOVERY_BACKEND=etcd DYN_EVENT_PLANE=nats DYN_REQUEST_PLANE=tcp
export DYN_LOG=${DYN_LOG:-info}

# start_worker I [MODEL]: worker I in the background (its pid in $RUN/worker-I.pid); without
# MODEL, kiln's default model.
start_worker() {
    local i=$1 model=()
    [ -n "${2:-}" ] && model=(--model "$2")
    DYN_SYSTEM_PORT=$((METRICS_BASE + i)) setsid "$WORKER" "${model[@]}" --parallel "$PARALLEL" --ctx "$CTX" \
        --backend "$BACKEND" --model-dir "$RUN/model" >"$RUN/worker-$i.log" 2>&1 </dev/null &
    echo $! >"$RUN/worker-$i.pid"
}

# start_frontend [ROUTER_MODE]: the Dynamo frontend in the background ($RUN/frontend.pid).
start_frontend() {
    local mode=${1:-$ROUTER_MODE}
    # --migration-limit: a request whose worker dies (in flight, or routed there before the
    # frontend noticed) is retried on another one.
    setsid "$VENV/bin/python" -m dynamo.frontend --http-port "$HTTP_PORT" --router-mode "$mode" \
        --kv-cache-block-size 16 --migration-limit "${KILN_DYNAMO_MIGRATION_LIMIT:-3}" >"$RUN/frontend.log" 2>&1 </dev/null &
    echo $! >"$RUN/frontend.pid"
}

# stop NAME: SIGTERM to the process group in $RUN/NAME.pid, SIGKILL after 10 s.
stop() {
    local f=$RUN/$1.pid
    [ -f "$f" ] || return 0
    local p; p=$(cat "$f")
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
    rm -f "$f"
}

# wait_http URL SECONDS: until URL answers 200.
wait_http() {
    for _ in $(seq $((${2:-60} * 4))); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.25
    done
    return 1
}
