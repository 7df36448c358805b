#!/usr/bin/env bash
# Speculative decoding against plain decoding, side by side: `kiln run --temp 0` with --spec off
# and --spec ngram (or draft), interleaved, on the prompts in bench/spec/ (a code edit that copies
# a ~900-token function with one change, a summary that quotes its input, free-form text). Prints
# each run's "generated N tokens, X t/s" and the median ratio per prompt; checks that the outputs
# are identical.
#
#   [PROMPTS="free"] bench/spec.sh [MODEL.gguf] [ROUNDS] [N_PREDICT] [kiln run flags for the speculating runs]
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}
MODEL=${1:-$HOME/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-5}
N=${3:-400}
shift $(( $# < 3 ? $# : 3 ))
SPEC=("$@")
[ ${#SPEC[@]} -eq 0 ] && SPEC=(--spec ngram)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for prompt in ${PROMPTS:-code_edit summarise free}; do
  ratios=()
  for r in $(seq "$ROUNDS"); do
    "$KILN" run -m "$MODEL" --temp 0 -n "$N" --spec off -p "$(cat bench/spec/$prompt.txt)" >"$tmp/off" 2>"$tmp/off.err"
    "$KILN" run -m "$MODEL" --temp 0 -n "$N" "${SPEC[@]}" -p "$(cat bench/spec/$prompt.txt)" >"$tmp/on" 2>"$tmp/on.err"
    cmp -s "$tmp/off" "$tmp/on" || { echo "$prompt: outputs differ"; exit 1; }
    off=$(grep -o 'generated [0-9]* tokens, [0-9.]* t/s' "$tmp/off.err" | awk '{print $4}')
    on=$(grep -o 'generated [0-9]* tokens, [0-9.]* t/s' "$tmp/on.err" | awk '{print $4}')
    ratios+=("$(python3 -c "print(f'{$on/$off:.3f}')")")
    echo "$prompt round $r: off $off t/s, ${SPEC[*]} $on t/s ($(grep -o 'drafted.*' "$tmp/on.err"))"
  done
  echo "$prompt: median ratio $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')× (identical outputs)"
done
