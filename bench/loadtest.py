#!/usr/bin/env python3
"""Load test for `kiln serve` (or any OpenAI-compatible server) with the official openai client.

First one stream alone for --single-seconds, then --streams parallel streams for --duration
seconds. Every stream sends streamed chat completions back to back; when time is up no new
request starts and the ones in flight run to their end. Reports completed/failed requests,
aggregate generated tokens/s, the single-stream rate, and p50/p99 time to first token.

    kiln serve --parallel 8 &
    python3 bench/loadtest.py --streams 8 --duration 120

Needs `python3 -m pip install openai`.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

try:
    import openai
except ImportError:
    sys.exit("loadtest: the openai package is missing: python3 -m pip install openai")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_http import PROMPTS  # noqa: E402


class Stats:
    def __init__(self):
        self.completed = 0
        self.failed = 0
        self.errors = []
        self.tokens = 0
        self.ttft = []
        # Per request: generated tokens / (end - first token), the decode rate a user sees.
        self.decode_rates = []


async def one_request(client, model, prompt, max_tokens, seed, stats):
    t0 = time.perf_counter()
    first = None
    finish = None
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.7,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                if first is None and (c.delta.content or ""):
                    first = time.perf_counter()
                if c.finish_reason:
                    finish = c.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
        stats.failed += 1
        stats.errors.append(f"{type(e).__name__}: {e}")
        return
    end = time.perf_counter()
    if finish is None or usage is None:
        stats.failed += 1
        stats.errors.append(f"incomplete stream (finish={finish}, usage={usage})")
        return
    stats.completed += 1
    stats.tokens += usage.completion_tokens
    if first is not None:
        stats.ttft.append(first - t0)
        if usage.completion_tokens > 1 and end > first:
            stats.decode_rates.append((usage.completion_tokens - 1) / (end - first))


async def stream_loop(client, model, idx, deadline, max_tokens, stats):
    n = 0
    while time.perf_counter() < deadline:
        prompt = PROMPTS[(idx * 5 + n) % len(PROMPTS)]
        await one_request(client, model, prompt, max_tokens, seed=idx * 1000 + n, stats=stats)
        n += 1


async def phase(client, model, streams, seconds, max_tokens):
    stats = Stats()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(stream_loop(client, model, i, deadline, max_tokens, stats) for i in range(streams)))
    return stats, time.perf_counter() - t0


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summary(name, stats, wall):
    return {
        "phase": name,
        "wall_s": round(wall, 1),
        "completed": stats.completed,
        "failed": stats.failed,
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 2),
        "ttft_p50_s": round(pct(stats.ttft, 50), 3),
        "ttft_p99_s": round(pct(stats.ttft, 99), 3),
        "per_request_decode_tokens_per_s_median": round(statistics.median(stats.decode_rates), 2)
        if stats.decode_rates
        else None,
        "errors": stats.errors[:5],
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", help="default: the first of /v1/models")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--duration", type=float, default=120, help="seconds of the parallel phase")
    ap.add_argument("--single-seconds", type=float, default=30, help="seconds of the one-stream phase (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()

    client = openai.AsyncOpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=600)
    model = a.model or (await client.models.list()).data[0].id
    results = []
    if a.single_seconds > 0:
        s, wall = await phase(client, model, 1, a.single_seconds, a.max_tokens)
        results.append(summary("1 stream", s, wall))
    s, wall = await phase(client, model, a.streams, a.duration, a.max_tokens)
    results.append(summary(f"{a.streams} streams", s, wall))

    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"model {model}, max_tokens {a.max_tokens}, temperature 0.7")
        print("| phase | wall s | completed | failed | tokens | tokens/s | TTFT p50 s | TTFT p99 s | per-request decode t/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {r['phase']} | {r['wall_s']} | {r['completed']} | {r['failed']} | {r['tokens']} | "
                f"{r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | "
                f"{r['per_request_decode_tokens_per_s_median']} |"
            )
        if len(results) == 2 and results[0]["tokens_per_s"] > 0:
            print(f"aggregate / single stream: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
        for r in results:
            for e in r["errors"]:
                print(f"error ({r['phase']}): {e}")
    failed = sum(r["failed"] for r in results)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    asyncio.run(main())
