#!/usr/bin/env bash
# bench/dynamo/up.sh N [MODEL.gguf]: etcd, NATS, the Dynamo frontend (KV-aware routing; set
# KILN_DYNAMO_ROUTER_MODE=random to compare) and N kiln workers on this machine. The OpenAI API is
# then at http://127.0.0.1:8000/v1; worker i's metrics at http://127.0.0.1:910i/metrics.
# MODEL defaults to kiln's default model (SmolLM2-135M-Instruct, fetched on first use). Needs
# etcd-server and nats-server (Debian packages), ai-dynamo in $KILN_DYNAMO_VENV
# (bench/dynamo/install.sh makes both) and the worker built (cd dynamo && cargo build --release).
# bench/dynamo/down.sh stops everything.
set -euo pipefail
source "$(dirname "$0")/env.sh"
N=${1:?usage: up.sh N [MODEL.gguf]}
MODEL=${2:-}
[ -z "$MODEL" ] || [ -f "$MODEL" ] || { echo "up.sh: $MODEL is not a file" >&2; exit 2; }
[ -x "$WORKER" ] || { echo "up.sh: $WORKER is missing: cd dynamo && cargo build --release" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || { echo "up.sh: no ai-dynamo in $VENV: bench/dynamo/install.sh" >&2; exit 2; }
mkdir -p "$RUN"
for f in "$RUN"/*.pid; do
    [ -e "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && { echo "up.sh: $(basename "$f" .pid) is running already: bench/dynamo/down.sh first" >&2; exit 2; }
done
rm -rf "$RUN/etcd-data" "$RUN/nats-data"
setsid "$ETCD" --data-dir "$RUN/etcd-data" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 >"$RUN/etcd.log" 2>&1 </dev/null &
echo $! >"$RUN/etcd.pid"
setsid "$NATS" -js -p 4222 -sd "$RUN/nats-data" >"$RUN/nats.log" 2>&1 </dev/null &
echo $! >"$RUN/nats.pid"
wait_http http://127.0.0.1:2379/health 30 || { echo "up.sh: etcd did not start ($RUN/etcd.log)" >&2; exit 1; }
start_frontend
for i in $(seq 1 "$N"); do start_worker "$i" "$MODEL"; done
echo "${MODEL:-default}" >"$RUN/model.arg"
echo "$N" >"$RUN/workers.count"
for i in $(seq 1 "$N"); do
    wait_http "http://127.0.0.1:$((METRICS_BASE + i))/health" 180 || { echo "up.sh: worker $i did not start ($RUN/worker-$i.log)" >&2; exit 1; }
done
# The frontend lists the model once a worker registered it.
for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" 2>/dev/null | grep -q '"id"' && break
    sleep 0.5
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" | grep -q '"id"' || { echo "up.sh: the frontend lists no model ($RUN/frontend.log)" >&2; exit 1; }
echo "up: frontend http://127.0.0.1:$HTTP_PORT/v1 (router $ROUTER_MODE), $N kiln workers, model ${MODEL:-the default model}"
