#!/usr/bin/env bash
# kiln's CUDA backend on a GPU machine: parity over the synth fixtures, then `kiln bench` on
# TinyLlama/SmolLM2/Llama-7B-shape synth models made there with ../shared/tools/make_synth_model.py.
#
# Carried beside the tree (git-ignored): target/cuda-bin/kiln (release build with --features cuda,
# stripped), target/devshare (a copy of ../shared: fixtures/parity, fixtures/tokenizer's llama vocab,
# models/synth, tools), .whl/gguf-*.whl (make_synth_model.py needs the gguf package).
# usage: crates/cuda/device-run.sh parity | bench MODEL_SPEC... | gen MODEL_SPEC... | prof ARGS MODEL_SPEC...
#   prof: GPU time per kernel (ncu, serialized) of `kiln bench --backend cuda ARGS` (ARGS one word,
#   e.g. "-p512,-n0,-r1"), summed by kernel name.
#   MODEL_SPEC: tinyllama:Q4_0, smollm2:Q4_1 (tied, Q8_0 embeddings as llama.cpp's table), llama7b:Q4_0
set -u
cd "$(dirname "$0")/../.."
KILN=$PWD/target/cuda-bin/kiln
OUT=${OUT:-/tmp/kiln-out}
M=/tmp/kiln-models
mkdir -p "$OUT" "$M"
[ -e ../shared ] || ln -s "$PWD/target/devshare" ../shared
export PATH=/usr/local/cuda/bin:$PATH
gen() {
    local preset=${1%%:*} ty=${1##*:} extra=""
    [ "$preset" = smollm2 ] && extra="--tied --embd-type Q8_0"
    local f=$M/$preset-$ty.gguf
    [ -s "$f" ] || python3 ../shared/tools/make_synth_model.py "$f" --type "$ty" --preset "$preset" $extra >"$OUT/gen-$preset-$ty.log" 2>&1
    echo "$f"
}
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site
stage=$1
shift
case $stage in
parity)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    "$KILN" parity --backend cuda --only synth-tiny 2>&1 | tee "$OUT/parity.md"
    ;;
gen)
    for s in "$@"; do gen "$s" & done
    wait
    ls -la $M
    ;;
all)
    # Models are made in the background while parity runs; bench waits for them.
    "$0" gen "$@" >"$OUT/gen.log" 2>&1 &
    genpid=$!
    "$0" parity
    wait $genpid
    "$0" bench "$@"
    ;;
prof)
    args=${1//,/ }
    shift
    for s in "$@"; do
        f=$(gen "$s")
        tag=$(echo "$s$args" | tr -c 'A-Za-z0-9_\n' _)
        echo "== $s ($args)"
        ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
            "$KILN" bench --backend cuda -m "$f" $args >"$OUT/ncu-$tag.csv" 2>"$OUT/ncu-$tag.err"
        python3 - "$OUT/ncu-$tag.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, vi = h.index("Kernel Name"), h.index("Metric Value")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[1:]:
    name = r[ki].split("(")[0][:60]
    tot[name] += float(r[vi].replace(",", "")) / 1e3
    cnt[name] += 1
all_us = sum(tot.values())
print(f"total {all_us:.0f} us over {sum(cnt.values())} launches")
for k, v in tot.most_common(25):
    print(f"{v:10.0f} us {100 * v / all_us:5.1f}% {cnt[k]:6d}  {k}")
PY
    done
    ;;
bench)
    for s in "$@"; do
        f=$(gen "$s")
        echo "== $s"
        "$KILN" bench --backend cuda -m "$f" -p 512 -n 128 -r "${REPS:-3}" 2>&1 | tee -a "$OUT/bench.md"
    done
    ;;
esac
