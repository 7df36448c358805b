#!/usr/bin/env bash
# bench/dynamo/down.sh: stops what up.sh started (workers, frontend, NATS, etcd).
source "$(dirname "$0")/env.sh"
for f in "$RUN"/worker-*.pid; do [ -e "$f" ] && stop "$(basename "$f" .pid)"; done
stop frontend
stop nats
stop etcd
echo "down"
