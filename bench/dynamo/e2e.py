#!/usr/bin/env python3
"""kiln behind NVIDIA Dynamo, checked end to end (bench/dynamo/e2e.sh brings the deployment up
with 2 workers and runs this; it tears it down after).

1. Correctness: the official `openai` client gets streamed and non-streamed chat completions
   through the Dynamo frontend; greedy answers equal `kiln serve`'s for the same prompts.
2. KV-aware routing: 20 conversations, each continued over 4 turns, one request at a time. Each
   request's worker is read from the workers' metrics (kiln_requests_started_total); a follow-up
   "lands on the holder" when it goes to the worker that served the conversation's previous
   turn, and that worker found the prefix in its cache (kiln_requests_prefix_hit_total). The same
   with the frontend restarted in random routing, for comparison; time to first token of the
   follow-ups in both.
3. Faults: a worker killed (SIGKILL) under load loses only its in-flight requests (they fail,
   none hangs), the other keeps serving; restarted, it rejoins and gets traffic. The frontend
   stopped and restarted recovers.
4. Load: 8 concurrent streams for --duration seconds through the frontend, 0 failed; the same
   load against `kiln serve` directly (as many slots as the workers together) for the overhead.

Prints `dynamo: routed-to-holder P%, failed F of N` last (F of N: the load test's requests);
exits 0 only if every check held.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
FAILURES = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def metrics(port):
    """The kiln_* counters of the worker serving /metrics on `port` (None when it is down)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("kiln_"):
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


class Deployment:
    """Handles on what up.sh started (bench/dynamo/env.sh's functions, through bash)."""

    def __init__(self, a):
        self.a = a
        self.ports = [a.metrics_base + i for i in (1, 2)]

    def sh(self, script):
        run(["bash", "-c", f"source {HERE}/env.sh; {script}"])

    def counters(self):
        return [metrics(p) for p in self.ports]

    def wait_model(self, timeout=120):
        t = time.time() + timeout
        while time.time() < t:
            try:
                with urllib.request.urlopen(f"{self.a.base_url}/models", timeout=5) as r:
                    if json.load(r).get("data"):
                        return True
            except Exception:
                pass
            time.sleep(0.5)
        return False

    def restart_frontend(self, mode):
        self.sh("stop frontend")
        self.sh(f"start_frontend {mode}")
        return self.wait_model()

    def kill_worker(self, i):
        with open(os.path.join(self.a.run_dir, f"worker-{i}.pid")) as f:
            pid = int(f.read())
        os.killpg(pid, signal.SIGKILL)

    def start_worker(self, i):
        model = "" if self.a.model == "default" else self.a.model
        self.sh(f"start_worker {i} {model}")


def client(a):
    from openai import OpenAI

    return OpenAI(base_url=a.base_url, api_key="none", timeout=120, max_retries=0)


def model_name(a):
    with urllib.request.urlopen(f"{a.base_url}/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a compiler does in one sentence.",
    "Say hello in Spanish.",
]


def correctness(a, dep):
    from openai import OpenAI

    name = model_name(a)
    front = client(a)
    direct = OpenAI(base_url=f"http://127.0.0.1:{a.kiln_port}/v1", api_key="none", timeout=120, max_retries=0)
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        r = front.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=48)
        text = r.choices[0].message.content or ""
        parts = []
        for ch in front.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=48, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
        streamed = "".join(parts)
        want = direct.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=48)
        want_text = want.choices[0].message.content or ""
        ok = bool(text) and text == streamed == want_text
        check(ok, f"greedy answer to {p!r} through Dynamo (streamed and not) = kiln serve's"
              + ("" if ok else f": {text!r} / {streamed!r} / {want_text!r}"))
        check(r.usage is not None and r.usage.completion_tokens == want.usage.completion_tokens
              and r.usage.prompt_tokens == want.usage.prompt_tokens,
              f"usage through Dynamo = kiln serve's ({r.usage} / {want.usage})")


TOPICS = ["rivers", "volcanoes", "bread", "trains", "owls", "glass", "chess", "tea", "bridges", "comets",
          "salt", "maps", "bees", "clocks", "paper", "wolves", "lighthouses", "copper", "tides", "kites"]


def conversations(a, dep, mode, salt):
    """20 conversations × 4 turns, one request at a time, in turn order. Returns (follow-ups on
    the holder, follow-ups, follow-up TTFTs)."""
    name = model_name(a)
    c = client(a)
    rng = random.Random(salt)
    convs = []
    for i, t in enumerate(TOPICS):
        # Each conversation's own words come first (distinct users): no two share a KV block.
        sys_msg = (f"{t.capitalize()} ({salt} {i}): you are a patient teacher. Answer questions about {t} in short, "
                   f"plain sentences, with one example each time. Keep every answer under forty words.")
        convs.append({"messages": [{"role": "system", "content": sys_msg}], "topic": t, "last": None})
    holder_hits, follow_ups, ttfts = 0, 0, []
    for turn in range(4):
        order = list(range(len(convs)))
        rng.shuffle(order)
        for i in order:
            conv = convs[i]
            q = f"Question {turn + 1} about {conv['topic']}: tell me something new about {conv['topic']}."
            conv["messages"].append({"role": "user", "content": q})
            before = dep.counters()
            t0 = time.perf_counter()
            first = None
            parts = []
            for ch in c.chat.completions.create(model=name, messages=conv["messages"], temperature=0,
                                                max_tokens=a.turn_tokens, stream=True):
                if ch.choices and ch.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(ch.choices[0].delta.content)
            answer = "".join(parts)
            conv["messages"].append({"role": "assistant", "content": answer})
            after = dep.counters()
            served = [w for w in range(2) if before[w] and after[w] and
                      after[w].get("kiln_requests_started_total", 0) > before[w].get("kiln_requests_started_total", 0)]
            worker = served[0] if len(served) == 1 else None
            if turn > 0:
                follow_ups += 1
                ttfts.append((first or time.perf_counter()) - t0)
                hit = worker is not None and after[worker].get("kiln_requests_prefix_hit_total", 0) > \
                    before[worker].get("kiln_requests_prefix_hit_total", 0)
                if worker is not None and worker == conv["last"] and hit:
                    holder_hits += 1
            conv["last"] = worker
    print(f"      {mode}: {holder_hits} of {follow_ups} follow-ups on the worker holding their prefix; "
          f"follow-up TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, mean {statistics.mean(ttfts) * 1000:.0f} ms",
          flush=True)
    return holder_hits, follow_ups, ttfts


class Load:
    """N streams sending chat requests back to back until stopped; records each request."""

    def __init__(self, base_url, n, max_tokens, model):
        self.base_url, self.n, self.max_tokens, self.model = base_url, n, max_tokens, model
        self.results = []  # (start, end, ok, tokens, error)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.stream, args=(i,), daemon=True) for i in range(n)]

    def stream(self, i):
        from openai import OpenAI

        c = OpenAI(base_url=self.base_url, api_key="none", timeout=90, max_retries=0)
        k = 0
        while not self.stop.is_set():
            k += 1
            msgs = [{"role": "user", "content": f"Stream {i}, request {k}: write a short paragraph about {TOPICS[(i + k) % 20]}."}]
            t0 = time.time()
            try:
                r = c.chat.completions.create(model=self.model, messages=msgs, temperature=0.7, seed=i * 1000 + k,
                                              max_tokens=self.max_tokens)
                res = (t0, time.time(), True, r.usage.completion_tokens if r.usage else 0, None)
            except Exception as e:  # the fault test expects some
                res = (t0, time.time(), False, 0, f"{type(e).__name__}: {str(e)[:120]}")
                time.sleep(0.2)
            with self.lock:
                self.results.append(res)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def finish(self, grace=120):
        self.stop.set()
        for t in self.threads:
            t.join(grace)
        return not any(t.is_alive() for t in self.threads)


def faults(a, dep):
    name = model_name(a)
    load = Load(a.base_url, 8, 48, name).start()
    time.sleep(8)
    t_kill = time.time()
    dep.kill_worker(2)
    time.sleep(20)
    ended = load.finish()
    check(ended, "after a worker is killed no request hangs (every stream ends within 120 s)")
    res = load.results
    in_flight = [r for r in res if r[0] < t_kill < r[1]]
    failed = [r for r in res if not r[2]]
    later = [r for r in res if r[0] > t_kill + 5]
    later_ok = [r for r in later if r[2]]
    print(f"      fault: {len(res)} requests, {len(in_flight)} in flight at the kill, {len(failed)} failed "
          f"({sorted(set(r[4] for r in failed))[:3]}), {len(later_ok)} of {len(later)} started 5 s after it succeeded",
          flush=True)
    check(len(failed) <= len(in_flight) + 8,
          f"killing a worker fails at most its in-flight requests ({len(failed)} failed, {len(in_flight)} in flight)")
    check(len(later) > 0 and len(later_ok) == len(later),
          f"the other worker keeps serving after the kill ({len(later_ok)} of {len(later)} requests started 5 s after it succeeded)")
    # Restart: it rejoins and receives traffic.
    dep.start_worker(2)
    t = time.time() + 180
    while time.time() < t and metrics(dep.ports[1]) is None:
        time.sleep(1)
    # Under load the router spreads requests by the workers' load: the new one gets some.
    joined = False
    load = Load(a.base_url, 8, 32, name).start()
    t = time.time() + 120
    while time.time() < t and not joined:
        time.sleep(1)
        joined = (metrics(dep.ports[1]) or {}).get("kiln_requests_started_total", 0) > 0
    load.finish()
    failed = [r for r in load.results if not r[2]]
    print(f"      rejoin: {len(load.results)} requests while it rejoined, {len(failed)} failed", flush=True)
    check(joined, "a restarted worker rejoins and receives requests")
    c = client(a)
    # The frontend stopped and restarted recovers.
    ok = dep.restart_frontend(a.router_mode)
    if ok:
        try:
            r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
            ok = bool(r.choices[0].message.content is not None)
        except Exception as e:
            print(f"      after the frontend's restart: {e}")
            ok = False
    check(ok, "the frontend stopped and restarted serves again")


def load_test(a, base_url, model, label):
    load = Load(base_url, 8, 64, model).start()
    time.sleep(a.duration)
    ended = load.finish()
    res = load.results
    done = [r for r in res if r[2]]
    t0 = min(r[0] for r in res)
    t1 = max(r[1] for r in res)
    tps = sum(r[3] for r in done) / (t1 - t0)
    failed = len(res) - len(done)
    errs = sorted(set(r[4] for r in res if not r[2]))[:3]
    print(f"      {label}: {len(res)} requests, {failed} failed {errs if errs else ''}, {tps:.1f} generated tokens/s "
          f"over {t1 - t0:.0f} s", flush=True)
    return ended, len(res), failed, tps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--run-dir", default=os.environ.get("KILN_DYNAMO_RUN", "/tmp/kiln-dynamo-run"))
    ap.add_argument("--metrics-base", type=int, default=int(os.environ.get("KILN_DYNAMO_METRICS_BASE", "9100")))
    ap.add_argument("--model", default="default", help="the GGUF the workers run ('default': kiln's default model)")
    ap.add_argument("--kiln", required=True, help="the kiln binary (kiln serve for the comparisons)")
    ap.add_argument("--kiln-port", type=int, default=8095)
    ap.add_argument("--router-mode", default="kv")
    ap.add_argument("--duration", type=float, default=120, help="seconds of the load test")
    ap.add_argument("--turn-tokens", type=int, default=32)
    a = ap.parse_args()
    dep = Deployment(a)
    kv_hits = kv_n = failed = n = 0

    parallel = int(os.environ.get("KILN_DYNAMO_PARALLEL", "16"))
    ctx = int(os.environ.get("KILN_DYNAMO_CTX", "1024"))
    serve_cmd = [a.kiln, "serve", "--port", str(a.kiln_port), "--parallel", str(2 * parallel), "--ctx", str(ctx)]
    if a.model != "default":
        serve_cmd += ["-m", a.model]
    serve = subprocess.Popen(serve_cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(a.run_dir, "kiln-serve.log"), "w"))
    try:
        t = time.time() + 120
        while time.time() < t:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.kiln_port}/health", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        print("== 1. correctness", flush=True)
        correctness(a, dep)

        print("== 2. KV-aware routing", flush=True)
        kv_hits, kv_n, kv_ttft = conversations(a, dep, "kv routing", "kv")
        check(kv_hits >= 0.9 * kv_n, f"with KV routing ≥ 90% of follow-ups land on the holder ({kv_hits}/{kv_n})")
        dep.restart_frontend("random")
        rnd_hits, rnd_n, rnd_ttft = conversations(a, dep, "random routing", "random")
        dep.restart_frontend(a.router_mode)
        check(statistics.mean(kv_ttft) < statistics.mean(rnd_ttft),
              f"follow-up TTFT lower with KV routing (mean {statistics.mean(kv_ttft) * 1000:.0f} ms vs "
              f"{statistics.mean(rnd_ttft) * 1000:.0f} ms random)")

        print("== 3. faults", flush=True)
        faults(a, dep)

        print("== 4. load", flush=True)
        name = model_name(a)
        ended, n, failed, tps = load_test(a, a.base_url, name, "through Dynamo (2 workers)")
        check(ended and failed == 0, f"8 streams for {a.duration:.0f} s through the frontend: 0 failed ({failed} of {n})")
        _, dn, dfailed, dtps = load_test(a, f"http://127.0.0.1:{a.kiln_port}/v1", name, "kiln serve directly")
        print(f"      throughput through Dynamo / direct kiln serve: {tps / dtps:.2f}×", flush=True)
    finally:
        serve.terminate()
        serve.wait(30)
    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all checks held", flush=True)
    pct = 100.0 * kv_hits / kv_n if kv_n else 0.0
    print(f"dynamo: routed-to-holder {pct:.0f}%, failed {failed} of {n}", flush=True)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
