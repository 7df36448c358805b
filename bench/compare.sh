#!/usr/bin/env bash
# Side-by-side speed of kiln and llama.cpp on the same models, threads and machine.
#
#   bench/compare.sh LLAMA_BENCH MODEL.gguf [MODEL.gguf ...]
#
# Environment: THREADS (2), REPS (3), PP (512), TG (128), KILN (path of the kiln binary; default:
# target/release/kiln, built if missing). Each repetition runs llama-bench once and kiln bench once,
# alternating, so that both see the same machine state; the table gives mean ± std over the
# repetitions, the ratio kiln / llama.cpp of the means and the median of the per-repetition ratios
# (robust when the machine's speed drifts between repetitions).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 LLAMA_BENCH MODEL.gguf [MODEL.gguf ...]" >&2
  exit 2
fi
LLAMA_BENCH=$1; shift
THREADS=${THREADS:-2}; REPS=${REPS:-3}; PP=${PP:-512}; TG=${TG:-128}
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}
if [ ! -x "$KILN" ]; then cargo build --release -p kiln-cli >&2; fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for model in "$@"; do
  name=$(basename "$model")
  for rep in $(seq 1 "$REPS"); do
    echo "[$name] repetition $rep/$REPS: llama.cpp" >&2
    "$LLAMA_BENCH" -m "$model" -t "$THREADS" -p "$PP" -n "$TG" -r 1 -o json > "$OUT/llama.$name.$rep.json" 2>/dev/null
    echo "[$name] repetition $rep/$REPS: kiln" >&2
    "$KILN" bench -m "$model" -t "$THREADS" -p "$PP" -n "$TG" -r 1 --json > "$OUT/kiln.$name.$rep.json"
  done
done
python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys, os, glob
out, models = sys.argv[1], sys.argv[2:]
def stats(v):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
print("| model | test | llama.cpp t/s | kiln t/s | kiln / llama.cpp | median of paired ratios |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for m in models:
    name = os.path.basename(m)
    llama, kiln = {}, {}
    for f in sorted(glob.glob(f"{out}/llama.{name}.*.json")):
        for r in json.load(open(f)):
            test = f"pp{r['n_prompt']}" if r["n_prompt"] > 0 else f"tg{r['n_gen']}"
            llama.setdefault(test, []).append(r["avg_ts"])
    for f in sorted(glob.glob(f"{out}/kiln.{name}.*.json")):
        for r in json.load(open(f)):
            kiln.setdefault(r["test"], []).append(r["avg_ts"])
    for test in sorted(set(llama) | set(kiln), key=lambda t: (t[:2] != "pp", t)):
        l, k = llama.get(test), kiln.get(test)
        ls = "%.2f ± %.2f" % stats(l) if l else "-"
        ks = "%.2f ± %.2f" % stats(k) if k else "-"
        ratio = "%.2f×" % (statistics.mean(k) / statistics.mean(l)) if l and k else "-"
        # Repetition i of both engines ran back to back: the ratio within a pair is robust to the
        # machine's drift between repetitions (other tenants, clock changes).
        paired = "%.2f×" % statistics.median(a / b for a, b in zip(k, l)) if l and k else "-"
        print(f"| {name} | {test} | {ls} | {ks} | {ratio} | {paired} |")
PY
