#!/usr/bin/env bash
# bench/dynamo/install.sh: what a local Dynamo deployment needs beside kiln: etcd and NATS
# (Debian packages etcd-server, nats-server) and NVIDIA Dynamo's frontend (PyPI ai-dynamo, in a
# virtual environment at $KILN_DYNAMO_VENV, with the openai client the checks use).
# Exits 3 when a package cannot be installed (no network, no apt), so callers can say SKIPPED.
set -uo pipefail
source "$(dirname "$0")/env.sh"
# protoc and libclang: the worker's build (prost-build; bindgen in a Dynamo dependency).
if ! [ -x "$ETCD" ] || ! [ -x "$NATS" ] || ! command -v protoc >/dev/null || ! ldconfig -p | grep -q libclang; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server nats-server \
        protobuf-compiler libclang-dev; } >/dev/null 2>&1 \
        || { echo "install.sh: could not install etcd-server, nats-server, protobuf-compiler, libclang-dev with apt-get" >&2; exit 3; }
fi
if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import dynamo.frontend, openai" 2>/dev/null; then
    python3 -m venv "$VENV" >/dev/null 2>&1 || { echo "install.sh: python3 -m venv failed" >&2; exit 3; }
    pip() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1; }
    # ai-dynamo 1.6.1 requires aisimulate, whose package downloads from pypi.nvidia.com at install
    # time; the frontend runs without it (it backs the --ais-* options only). So: ai-dynamo and its
    # runtime without dependencies, then their other requirements as their metadata lists them.
    pip --no-deps "ai-dynamo==1.6.1" "ai-dynamo-runtime==1.6.1" \
        && pip "aiohttp>=3.14.3,<4" "certifi>=2026.10.19" "kubernetes>=32.0.1,<33" "msgspec>=0.19" \
            "prometheus-client>=0.23.1,<1" "pyzmq>=26" "redis>=6.2,<9" "tqdm>=4" "transformers>=4.56" \
            "typing-extensions>=4.10" "zstandard>=0.23,<1" "pydantic>=2.10.6,<=2.13.5" "uvloop>=0.21" openai \
        || { echo "install.sh: could not pip install ai-dynamo==1.6.1 and its requirements" >&2; exit 3; }
fi
echo "install: etcd $("$ETCD" --version | head -1 | awk '{print $3}'), nats-server $("$NATS" --version | awk '{print $NF}'), ai-dynamo in $VENV"
