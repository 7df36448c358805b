#!/usr/bin/env python3
"""Load test for `kiln serve` (or any OpenAI-compatible server, llama-server included).

For each N of --streams, N streams send streamed requests back to back for --duration seconds
(when time is up no new request starts and the ones in flight run to their end). Prompts come
from a fixed set (bench/kiln_http.py's PROMPTS), the same order for every server. Reports, per N:
completed and failed requests, aggregate generated tokens/s, p50/p99 time to first token and
the median per-request decode rate.

    kiln serve --backend cuda --parallel 64 --ctx 512 &
    python3 bench/loadtest.py --streams 1,8,32,64 --duration 60 --max-tokens 256

`--endpoint completions` (default) sends the prompt as raw text to /v1/completions, so that two
servers with different chat-template defaults see the same tokens; `chat` uses
/v1/chat/completions. Generated tokens are the server's count (`usage.completion_tokens`, or
llama-server's `timings.predicted_n`), else the number of streamed pieces. No dependencies beyond
the standard library (the HTTP client is bench/kiln_http.py).
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_http import PROMPTS, describe, request, simple  # noqa: E402


class Stats:
    def __init__(self):
        self.completed = 0
        self.failed = 0
        self.errors = []
        self.tokens = 0
        self.ttft = []
        # Per request: generated tokens / (end - first token), the decode rate a user sees.
        self.decode_rates = []


async def one_request(srv, a, prompt, seed, stats):
    host, port, base = srv
    body = {
        "model": a.model,
        "max_tokens": a.max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if a.endpoint == "chat":
        path = base + "/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = base + "/completions"
        body["prompt"] = prompt
    t0 = time.perf_counter()
    first = None
    finish = None
    counted = None
    pieces = 0
    try:
        r = await request(host, port, "POST", path, body, timeout=600)
        try:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.body(30))[:200]!r}")
            async for t, data in r.sse(600):
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                for c in ev.get("choices") or []:
                    text = c.get("text") if a.endpoint != "chat" else (c.get("delta") or {}).get("content")
                    if text:
                        pieces += 1
                        if first is None:
                            first = t
                    if c.get("finish_reason"):
                        finish = c["finish_reason"]
                if ev.get("usage"):
                    counted = ev["usage"].get("completion_tokens", counted)
                if ev.get("timings") and counted is None:
                    counted = ev["timings"].get("predicted_n")
        finally:
            r.close()
    except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
        stats.failed += 1
        stats.errors.append(describe(e))
        return
    end = time.perf_counter()
    if finish is None:
        stats.failed += 1
        stats.errors.append("stream ended without a finish_reason")
        return
    n = counted if counted is not None else pieces
    stats.completed += 1
    stats.tokens += n
    if first is not None:
        stats.ttft.append(first - t0)
        if n > 1 and end > first:
            stats.decode_rates.append((n - 1) / (end - first))


async def stream_loop(srv, a, idx, deadline, stats):
    n = 0
    while time.perf_counter() < deadline:
        prompt = PROMPTS[(idx * 5 + n) % len(PROMPTS)]
        await one_request(srv, a, prompt, seed=idx * 1000 + n, stats=stats)
        n += 1


async def phase(srv, a, streams):
    stats = Stats()
    t0 = time.perf_counter()
    deadline = t0 + a.duration
    await asyncio.gather(*(stream_loop(srv, a, i, deadline, stats) for i in range(streams)))
    return stats, time.perf_counter() - t0


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summary(streams, stats, wall):
    return {
        "streams": streams,
        "wall_s": round(wall, 1),
        "completed": stats.completed,
        "failed": stats.failed,
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 2),
        "ttft_p50_s": round(pct(stats.ttft, 50), 4),
        "ttft_p99_s": round(pct(stats.ttft, 99), 4),
        "per_request_decode_tokens_per_s_median": round(statistics.median(stats.decode_rates), 2)
        if stats.decode_rates
        else None,
        "errors": stats.errors[:5],
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", help="default: the first of /v1/models")
    ap.add_argument("--streams", default="8", help="comma-separated stream counts, run in turn")
    ap.add_argument("--duration", type=float, default=60, help="seconds of each phase")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--label", default="", help="a name for this server in the table")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()
    u = urlparse(a.base_url)
    srv = (u.hostname, u.port or 80, u.path.rstrip("/"))
    if a.model is None:
        status, body = await simple(srv[0], srv[1], "GET", srv[2] + "/models", timeout=30)
        a.model = json.loads(body)["data"][0]["id"] if status == 200 else "default"
    results = []
    for n in [int(x) for x in a.streams.split(",")]:
        s, wall = await phase(srv, a, n)
        results.append(summary(n, s, wall))
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{a.label} model {a.model}, max_tokens {a.max_tokens}, temperature 0.7, {a.endpoint}")
        print("| server | streams | wall s | completed | failed | tokens | tokens/s | TTFT p50 s | TTFT p99 s | per-request decode t/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {a.label} | {r['streams']} | {r['wall_s']} | {r['completed']} | {r['failed']} | {r['tokens']} | "
                f"{r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | "
                f"{r['per_request_decode_tokens_per_s_median']} |"
            )
        for r in results:
            for e in r["errors"]:
                print(f"error ({r['streams']} streams): {e}")
    sys.exit(1 if sum(r["failed"] for r in results) else 0)


if __name__ == "__main__":
    asyncio.run(main())
