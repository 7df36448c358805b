#!/usr/bin/env bash
# On the device: starts pipeline.sh detached (once per machine) and waits up to $1 seconds for it,
# then prints its progress and results so far and leaves /tmp/logs in $OUT/logs.tgz.
D=$PWD/.dev L=/tmp/logs
mkdir -p $L
if [ ! -e $L/started ]; then
    touch $L/started
    setsid nohup bash $D/kit/pipeline.sh $D > $L/pipeline.out 2>&1 < /dev/null &
fi
end=$((SECONDS + ${1:-540}))
while [ ! -e $L/DONE ] && [ $SECONDS -lt $end ]; do sleep 5; done
cat $L/progress.txt
for f in $L/lt-*.json; do
    [ -e "$f" ] && python3 - "$f" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(sys.argv[1].split("/")[-1], [(x["streams"], x["tokens_per_s"], x["failed"], x["ttft_p50_s"], x["ttft_p99_s"]) for x in r])
except Exception as e:
    print(sys.argv[1], "unreadable", e)
PY
done
tail -4 $L/gpu-tests*.log $L/batch-inv*.log 2>/dev/null
for f in $L/bench-*.md; do [ -e "$f" ] && { echo "== $f"; grep -h "tg128\|pp512\|failed\|error" "$f"; }; done
[ -e $L/parity.md ] && tail -22 $L/parity.md
tar czf $OUT/logs.tgz -C /tmp logs
