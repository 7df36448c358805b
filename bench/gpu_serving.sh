#!/usr/bin/env bash
# kiln serve --backend cuda against llama-server built from the same llama.cpp source, side by side on
# one GPU machine (issue 25's load test).
#
#   bench/gpu_serving.sh KILN LLAMA_SRC MODEL.gguf [STREAMS] [DURATION]
#
# KILN: a kiln binary built with --features cuda. LLAMA_SRC: llama.cpp's source (e.g. llama-cpp-python
# 0.3.36's vendor/llama.cpp; needs CMakeLists.txt, cmake, ggml, src, include, common, tools, vendor, app, scripts);
# llama-server is built there once (CUDA, sm_90, no UI, no network) into LLAMA_SRC/build-cuda.
# MODEL: e.g. ../shared/tools/make_synth_model.py M.gguf --preset tinyllama --type Q4_0.
# Both servers get 64 slots of 512 positions; bench/loadtest.py runs STREAMS (default 1,8,32,64) for
# DURATION seconds (default 30) each, kiln, then llama-server, then kiln again.
set -eu
KILN=$1 SRC=$2 MODEL=$3 STREAMS=${4:-1,8,32,64} DUR=${5:-30}
cd "$(dirname "$0")/.."
LS=$SRC/build-cuda/bin/llama-server
if [ ! -x "$LS" ]; then
    cmake -S "$SRC" -B "$SRC/build-cuda" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    ninja -C "$SRC/build-cuda" llama-server
fi
wait_up() { for _ in $(seq 120); do curl -sf "localhost:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
kiln() {
    "$KILN" serve --backend cuda -m "$MODEL" --parallel 64 --ctx 512 --port 8090 &
    local p=$!
    wait_up 8090
    python3 bench/loadtest.py --base-url http://127.0.0.1:8090/v1 --streams "$STREAMS" --duration "$DUR" --label "kiln $1" || true
    kill $p; wait $p 2>/dev/null || true
}
kiln 1
"$LS" -m "$MODEL" -ngl 99 -fa on -np 64 -c 32768 --port 8091 --no-webui &
p=$!
wait_up 8091
python3 bench/loadtest.py --base-url http://127.0.0.1:8091/v1 --streams "$STREAMS" --duration "$DUR" --label llama-server || true
kill $p; wait $p 2>/dev/null || true
kiln 2
