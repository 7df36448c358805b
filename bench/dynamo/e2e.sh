#!/usr/bin/env bash
# bench/dynamo/e2e.sh [--duration S]: builds kiln and the Dynamo worker, brings up etcd, NATS, the
# Dynamo frontend (KV-aware routing) and 2 kiln workers on kiln's default model, runs
# bench/dynamo/e2e.py (correctness against kiln serve, KV routing against random routing, worker
# and frontend faults, 8 streams of load), tears everything down, and exits 0 only if every check
# held. Its last line: `dynamo: routed-to-holder P%, failed F of N`.
# Exit 3 (and a SKIPPED line): etcd, NATS or ai-dynamo could not be installed.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/dynamo/env.sh
DURATION=120
while [ $# -gt 0 ]; do
    case $1 in
        --duration) DURATION=$2; shift 2 ;;
        *) echo "usage: e2e.sh [--duration SECONDS]" >&2; exit 2 ;;
    esac
done
bench/dynamo/install.sh
rc=$?
if [ $rc = 3 ]; then echo "dynamo e2e: SKIPPED (the packages above could not be installed)"; exit 3; fi
[ $rc = 0 ] || exit $rc
echo "== build"
cargo build --release -q -p kiln-cli || exit 1
(cd dynamo && cargo build --release -q) || exit 1
# The default model, fetched once here rather than by two workers at once.
./target/release/kiln tokenize "hi" >/dev/null || exit 1
mkdir -p "$RUN"
trap 'bench/dynamo/down.sh >/dev/null 2>&1' EXIT
bench/dynamo/up.sh 2 || { tail -20 "$RUN"/*.log; exit 1; }
"$VENV/bin/python" bench/dynamo/e2e.py --kiln ./target/release/kiln --duration "$DURATION"
