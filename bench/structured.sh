#!/usr/bin/env bash
# The cost of constrained decoding: generation speed with a JSON Schema active vs. the same number
# of tokens unconstrained, same prompt, same model, runs interleaved.
#
#   bench/structured.sh [MODEL.gguf]      (default: SmolLM2-135M-Instruct, kiln's default model)
#
# Environment: REPS (5), THREADS (2), KILN (default target/release/kiln, built if missing).
# Each repetition runs `kiln run --json-schema` (greedy) and then `kiln run --ignore-eos -n N` with N
# the number of tokens the constrained run generated, and reads "generated N tokens, X t/s" from
# stderr; the table gives the mean t/s of each, their ratio, and the schema compile time.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}; THREADS=${THREADS:-2}
KILN=${KILN:-target/release/kiln}
if [ ! -x "$KILN" ]; then cargo build --release -p kiln-cli >&2; fi
MODEL_ARGS=()
if [ $# -ge 1 ]; then MODEL_ARGS=(-m "$1"); fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A schema whose answer is long (a list of 24 records), so that decode speed dominates.
cat > "$OUT/schema.json" <<'JSON'
{"type": "object", "properties": {"books": {"type": "array", "minItems": 24, "maxItems": 24, "items": {
  "type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40}, "author": {"type": "string", "maxLength": 30},
    "year": {"type": "integer", "minimum": 1500, "maximum": 2025},
    "genre": {"enum": ["novel", "poetry", "drama", "essay", "science"]}},
  "required": ["title", "author", "year", "genre"], "additionalProperties": false}}},
 "required": ["books"], "additionalProperties": false}
JSON
PROMPT="List 24 classic books as JSON with title, author, year and genre."
tps() { sed -n 's/.*generated \([0-9]*\) tokens, \([0-9.]*\) t\/s.*/\1 \2/p' "$1"; }
for rep in $(seq 1 "$REPS"); do
  "$KILN" run "${MODEL_ARGS[@]}" -t "$THREADS" --temp 0 -n 2048 --json-schema "$OUT/schema.json" "$PROMPT" \
    > "$OUT/c.$rep.out" 2> "$OUT/c.$rep.err"
  read -r n c_tps < <(tps "$OUT/c.$rep.err")
  ms=$(sed -n 's/.*compiled in \([0-9.]*\) ms.*/\1/p' "$OUT/c.$rep.err")
  "$KILN" run "${MODEL_ARGS[@]}" -t "$THREADS" --temp 0 -n "$n" --ignore-eos "$PROMPT" > /dev/null 2> "$OUT/u.$rep.err"
  read -r n2 u_tps < <(tps "$OUT/u.$rep.err")
  echo "rep $rep: constrained $n tokens $c_tps t/s (schema compiled in $ms ms) | unconstrained $n2 tokens $u_tps t/s" >&2
  echo "$c_tps $u_tps $ms" >> "$OUT/rows"
done
python3 - "$OUT/rows" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
c = [r[0] for r in rows]; u = [r[1] for r in rows]; ms = [r[2] for r in rows]
ratios = [a / b for a, b in zip(c, u)]
print("| constrained t/s | unconstrained t/s | ratio (means) | median per-rep ratio | schema compile ms |")
print("|---|---|---|---|---|")
print(f"| {statistics.mean(c):.1f} ± {statistics.pstdev(c):.1f} | {statistics.mean(u):.1f} ± {statistics.pstdev(u):.1f} "
      f"| {statistics.mean(c) / statistics.mean(u):.3f} | {statistics.median(ratios):.3f} | {statistics.median(ms):.1f} |")
PY
