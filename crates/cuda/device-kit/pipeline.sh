#!/usr/bin/env bash
# On the device, detached (collect.sh starts it): what a GPU session measures, most wanted first, so
# that a call cut short still brings back the earlier stages. Logs and results in /tmp/logs;
# progress.txt says what ran and each check's exit status.
#  1. llama.cpp build in the background (llama-server, llama-bench), TinyLlama- and 7B-shape Q4_0
#     synthetic models made in the background.
#  2. Bits: the gpu tests, batch_invariance gpu_serving with the tensor-core rows forced
#     (KILN_CUDA_MMA=1: steps of <= 8 rows through mma_rows8, more through mma_rows), and greedy
#     text with and without programmatic dependent launch (KILN_CUDA_PDL=1) on synth-tiny models.
#  3. Decode speed (issue 29): kiln bench tg128/pp512 on TinyLlama and 7B, PDL off / on / on with
#     8 steps of L2 prefetch, two rounds interleaved.
#  4. Serving rows (issue 25): 1 and 8 streams on a 64-slot server: tensor cores with the one-tile
#     kernel (the default), without it (KILN_CUDA_MMA_FEW=0), CUDA cores (KILN_CUDA_MMA=0).
#  5. kiln parity --backend cuda --only synth-tiny through the serving rows (KILN_CUDA_MMA=1).
#  6. Once llama.cpp is built: the load-test table against llama-server (1/8/32/64 streams, both
#     models) and llama-bench beside kiln bench; ncu of four 7B decode steps.
set -u
D=$1 L=/tmp/logs
cd "$(dirname "$D")"
mkdir -p $L /tmp/m
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
log() { echo "[$(date +%T)] $*" >> $L/progress.txt; }
rc() { echo "$1 rc $2" >> $L/progress.txt; }
log start
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv > $L/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $D/whl/*.whl
[ -e ../shared/models ] || { rm -rf ../shared; ln -s $D/share ../shared; }
build=
if [ -e $D/llama-src.tar.xz ]; then
    ( mkdir -p /tmp/llama && tar xJf $D/llama-src.tar.xz -C /tmp/llama &&
      cmake -S /tmp/llama -B /tmp/llama/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > $L/llama-cmake.log 2>&1 &&
      nice ninja -C /tmp/llama/build -j 10 llama-server llama-bench > $L/llama-build.log 2>&1; rc "llama build" $? ) &
    build=$!
fi
( for m in "tl tinyllama" "7b llama7b"; do
      set -- $m
      python3 $D/share/tools/make_synth_model.py /tmp/m/$1.gguf --preset $2 --type Q4_0 > $L/gen-$1.log 2>&1
      [ -s /tmp/m/$1.gguf ] && log "$1 made" || log "$1 FAILED"
  done ) &
gen=$!
export KILN_SYNTH_DIR=$D/share/models/synth
log gpu tests
timeout 240 $D/gpu_tests --test-threads 1 > $L/gpu-tests.log 2>&1; rc "gpu tests" $?
KILN_CUDA_PDL=1 timeout 240 $D/gpu_tests --test-threads 1 > $L/gpu-tests-pdl.log 2>&1; rc "gpu tests pdl" $?
log batch invariance
KILN_CUDA_MMA=1 timeout 300 $D/batch_invariance gpu_serving --nocapture > $L/batch-inv-mma.log 2>&1; rc "batch_invariance mma" $?
log pdl text
for f in synth-tiny-Q4_0 synth-tiny-Q8_0 synth-tiny-Q4_K synth-tiny-mixed; do
    for pdl in 0 1; do
        KILN_CUDA_PDL=$pdl timeout 60 $D/kiln run --backend cuda -m $KILN_SYNTH_DIR/$f.gguf --temp 0 -n 300 --raw --spec off "Once upon a time" > $L/gen-$f-$pdl.txt 2> $L/gen-$f-$pdl.err
    done
    cmp -s $L/gen-$f-0.txt $L/gen-$f-1.txt && echo "pdl same text $f ($(wc -c < $L/gen-$f-0.txt) bytes)" >> $L/progress.txt || echo "pdl DIFFERENT $f" >> $L/progress.txt
done
wait_for() { for _ in $(seq 300); do grep -q "$1 made\|$1 FAILED" $L/progress.txt && return; sleep 1; done; }
bench() { # model rounds
    local m=$1
    for _ in $(seq $2); do
        for v in "0 0" "1 0" "1 8"; do
            set -- $v
            KILN_CUDA_PDL=$1 KILN_MVF_PF=$2 $D/kiln bench --backend cuda -m /tmp/m/$m.gguf -p 512 -n 128 -r 3 >> $L/bench-kiln-$m-pdl$1-pf$2.md 2>&1
        done
    done
}
for m in tl 7b; do wait_for $m; log "bench $m"; bench $m 2; done
wait_up() { for _ in $(seq 240); do curl -sf "localhost:$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }
lt() { # label model streams duration env...
    local label=$1 model=$2 streams=$3 dur=$4; shift 4
    env "$@" $D/kiln serve --backend cuda -m /tmp/m/$model.gguf --parallel 64 --ctx 512 --port 8090 > $L/serve-$label.log 2>&1 &
    local p=$!
    if wait_up 8090; then
        python3 bench/loadtest.py --base-url http://127.0.0.1:8090/v1 --streams $streams --duration $dur --max-tokens 256 --label "$label" --json > $L/lt-$label.json 2>&1
    else
        echo "$label: server did not come up" >> $L/progress.txt
    fi
    kill $p; wait $p 2>/dev/null
    log "lt $label done"
}
log serving rows
for m in 7b tl; do
    lt $m-mma8 $m 1,8 8 KILN_CUDA_MMA=1
    lt $m-mma64 $m 1,8 8 KILN_CUDA_MMA=1 KILN_CUDA_MMA_FEW=0
    lt $m-cores $m 1,8 8 KILN_CUDA_MMA=0
done
log parity
KILN_CUDA_MMA=1 timeout 150 $D/kiln parity --backend cuda --only synth-tiny > $L/parity.md 2>&1; rc parity $?
if [ -n "$build" ]; then
    log waiting for llama build
    wait $build
    LS=/tmp/llama/build/bin/llama-server
    for m in tl 7b; do
        lt $m-kiln $m 1,8,32,64 10
        $LS -m /tmp/m/$m.gguf -ngl 99 -fa on -np 64 -c 32768 --port 8091 --no-webui > $L/llama-server-$m.log 2>&1 &
        p=$!
        if wait_up 8091; then
            python3 bench/loadtest.py --base-url http://127.0.0.1:8091/v1 --streams 1,8,32,64 --duration 10 --max-tokens 256 --label llama-server --json > $L/lt-$m-llama.json 2>&1
        else echo "llama-server $m did not come up" >> $L/progress.txt; fi
        kill $p; wait $p 2>/dev/null
        log "llama-server $m done"
    done
    for m in tl 7b; do
        /tmp/llama/build/bin/llama-bench -m /tmp/m/$m.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 3 > $L/bench-llama-$m.md 2>&1
    done
fi
log ncu
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --print-units base \
    $D/kiln bench --backend cuda -m /tmp/m/7b.gguf -p 0 -n 4 -r 1 > $L/ncu-7b.csv 2> $L/ncu-7b.err
log done
touch $L/DONE
