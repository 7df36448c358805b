#!/usr/bin/env python3
"""Soak test for `kiln serve`: mixed well-behaved and hostile load for a long time (issue 26's soak bar).

Starts `kiln serve` itself (default: `--ctx 4608 --parallel 8`, so a 4,000-token prompt fits), then:

1. Unloaded baseline: one streamed chat alone for --baseline-seconds (back-to-back requests),
   then the --streams well-behaved streams alone (no hostile traffic) for --clean-seconds; the
   gap between successive content chunks (the inter-token gap) is recorded for both.
2. Mixed load for --duration seconds, all at once:
   - --streams well-behaved streaming chat clients in a loop (max_tokens 128, temperature 0.7);
     every request must answer HTTP 200, end with `data: [DONE]`, carry a finish_reason and no
     error event; every inter-token gap is recorded;
   - --slowloris connections sending a partial request head, one byte every few seconds,
     reconnecting whenever the server closes them;
   - --disconnectors clients that start a stream, read a random number of chunks (possibly
     none, not even the response head) and close (or reset) the connection;
   - malformed requests, 1 in --malformed-every of all requests (bad JSON, unknown fields,
     wrong types, oversized max_tokens, invalid UTF-8, ...): each must get a 4xx within
     --malformed-timeout, never a 5xx, never a hang;
   - every --long-every seconds a ~--long-tokens-token prompt (deterministic text, different
     for each request so the prefix cache cannot shortcut it) with max_tokens 16;
   - every --sample-every seconds the server's RSS (/proc/PID/status VmRSS) and open file
     descriptors (/proc/PID/fd); every --health-every seconds the latency of GET /health.
3. A markdown summary and pass/fail against the bar: 0 failed well-behaved requests, p99
   inter-token gap under 4x the unloaded value, RSS growth < 10% after the first 5 minutes (for a
   run shorter than 30 minutes: after the first sixth of it), file descriptors bounded (never
   above the connections this script opens + 64, and back to the idle count after the load).

The unloaded value the gap bar uses is --gap-baseline: `single` (one stream alone, default) or
`clean` (the --streams well-behaved streams without hostile traffic); both ratios are printed.
On a 2-core machine 8 batched streams are several times slower per stream than one alone, so
the `single` ratio measures batching as much as hostility; `clean` isolates the hostile part.

Dependency-free: raw asyncio HTTP/1.1 with `Connection: close`.

    cargo build --release
    python3 bench/soak.py                                  # 30 min, target/release/kiln, SmolLM2
    python3 bench/soak.py --kiln target/debug/kiln --duration 60 --slowloris 50   # a quick try

Exit status 0 when every bar passes, 1 otherwise.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

DEFAULT_MODEL = os.path.expanduser("~/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf")



# ---------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 client (one request per connection, `Connection: close`)
# ---------------------------------------------------------------------------------------------


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_http import PROMPTS, Response, request, simple, describe  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def ms(x):
    return "n/a" if x != x else f"{x * 1000:.1f}"


class Counter(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n


class Soak:
    def __init__(self, a, host, port, pid):
        self.a, self.host, self.port, self.pid = a, host, port, pid
        self.stop = asyncio.Event()
        self.started = 0  # requests started by every kind of client (the 1-in-N base)
        # well-behaved streams
        self.wb_ok = 0
        self.wb_fail = Counter()
        self.wb_fail_examples = []
        self.wb_tokens = 0
        self.gaps = []
        # long prompts
        self.long_ok = 0
        self.long_fail = Counter()
        self.long_info = []  # (prompt tokens, ttft s, total s)
        # malformed
        self.bad_by_kind = {}  # kind -> Counter(status or failure)
        self.bad_sent = 0
        self.bad_problems = []
        # disconnectors
        self.disc = Counter()
        # slowloris
        self.sl = Counter()
        self.sl_held = []  # seconds a slowloris connection was held before the server closed it
        self.sl_open = 0
        self.sl_open_max = 0
        # samples
        self.samples = []  # (t since load start, rss kB, fds)
        self.health = []  # (t, latency s, status or error)
        self.t0 = None


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def chat_body(prompt, max_tokens, seed=None, temperature=0.7, **extra):
    b = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        b["seed"] = seed
    b.update(extra)
    return b


async def checked_stream(host, port, body, read_timeout):
    """Runs one streamed chat; returns (failure reason or None, content-chunk times, usage, ttft)."""
    t_start = time.perf_counter()
    times, usage, finish, done, err = [], None, None, False, None
    try:
        r = await request(host, port, "POST", "/v1/chat/completions", body, read_timeout)
    except Exception as e:  # noqa: BLE001
        return f"connect/send: {describe(e)}", times, usage, None
    try:
        if r.status != 200:
            text = (await r.body(read_timeout))[:200].decode("utf-8", "replace")
            return f"HTTP {r.status}: {text}", times, usage, None
        async for t, data in r.sse(read_timeout):
            if done:
                err = err or "data after [DONE]"
                continue
            if data == b"[DONE]":
                done = True
                continue
            try:
                ev = json.loads(data)
            except ValueError:
                err = err or f"unparsable event {data[:80]!r}"
                continue
            if "error" in ev:
                err = err or f"error event: {str(ev['error'].get('message', ev['error']))[:120]}"
                continue
            for c in ev.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    times.append(t)
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
            if ev.get("usage"):
                usage = ev["usage"]
    except Exception as e:  # noqa: BLE001
        return f"mid-stream: {describe(e)}", times, usage, None
    finally:
        r.close()
    ttft = times[0] - t_start if times else None
    if err:
        return err, times, usage, ttft
    if not done:
        return "no [DONE]", times, usage, ttft
    if finish is None:
        return "no finish_reason", times, usage, ttft
    return None, times, usage, ttft


async def well_behaved(s, idx, gaps, deadline=None):
    """Back-to-back streamed chats until `deadline` (perf_counter) or s.stop; gaps appended."""
    n = 0
    while not s.stop.is_set() and (deadline is None or time.perf_counter() < deadline):
        body = chat_body(PROMPTS[(idx * 5 + n) % len(PROMPTS)], s.a.max_tokens, seed=idx * 100003 + n)
        s.started += 1
        fail, times, usage, _ = await checked_stream(s.host, s.port, body, s.a.read_timeout)
        gaps.extend(b - a for a, b in zip(times, times[1:]))
        if usage:
            s.wb_tokens += usage.get("completion_tokens", 0)
        if fail:
            key = fail.split(":")[0]
            s.wb_fail.add(key)
            if len(s.wb_fail_examples) < 10:
                s.wb_fail_examples.append(fail)
            await asyncio.sleep(0.5)  # do not spin on a dead server
        else:
            s.wb_ok += 1
        n += 1


def long_text(k, sentences):
    colors = ["red", "green", "blue", "amber", "violet", "silver", "black"]
    things = ["river", "tower", "garden", "engine", "lantern", "harbor", "forest", "bridge", "market", "valley", "kiln"]
    out = [f"Report {k}, checksum {(k * 7919) % 100003}. Read the numbered notes and answer at the end.\n"]
    for i in range(sentences):
        j = i + 37 * k
        out.append(
            f"Note {i + 1}: the {colors[j % 7]} {things[j % 11]} number {(j * 97) % 1009} "
            f"holds {(j * 31) % 211} crates and {(j * 13) % 89} barrels.\n"
        )
    out.append("Question: which note mentions the largest number of crates? Answer briefly.")
    return "".join(out)


async def calibrate_long(s):
    """Number of sentences giving about --long-tokens prompt tokens (via POST /tokenize)."""
    target = s.a.long_tokens
    n = max(10, target // 30)
    for _ in range(4):
        st, b = await simple(s.host, s.port, "POST", "/tokenize", {"content": long_text(0, n)}, 60)
        if st != 200:
            raise RuntimeError(f"/tokenize answered {st}: {b[:200]!r}")
        tokens = len(json.loads(b)["tokens"])
        per = (tokens - 40) / n
        new = max(10, int((target - 40) / per))
        if abs(tokens - target) <= max(20, target // 100) or new == n:
            return n, tokens
        n = new
    return n, tokens


async def long_prompts(s, sentences):
    k = 0
    next_t = s.t0 + s.a.long_every / 2
    while not s.stop.is_set():
        now = time.perf_counter()
        if now < next_t:
            try:
                await asyncio.wait_for(s.stop.wait(), next_t - now)
            except asyncio.TimeoutError:
                pass
            continue
        next_t += s.a.long_every
        k += 1
        s.started += 1
        body = chat_body(long_text(k, sentences), 16, seed=k)
        t = time.perf_counter()
        fail, times, usage, ttft = await checked_stream(s.host, s.port, body, s.a.long_timeout)
        if fail:
            s.long_fail.add(fail[:120])
        else:
            s.long_ok += 1
        s.long_info.append(((usage or {}).get("prompt_tokens"), ttft, time.perf_counter() - t))


def malformed_cases():
    """(kind, body bytes) pairs; every one must be answered with a 4xx."""

    def j(**kw):
        b = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
        b.update(kw)
        return json.dumps(b).encode()

    return [
        ("bad JSON (truncated)", b'{"messages": [{"role": "user", "content": "hi"}'),
        ("bad JSON (not JSON)", b"hello, server"),
        ("bad JSON (trailing comma)", b'{"messages": [{"role": "user", "content": "hi"},], "max_tokens": 8}'),
        ("unknown field", j(frobnicate=True)),
        ("unknown field (logit_bias)", j(logit_bias={"42": 5})),
        ("wrong type: messages string", j(messages="hello")),
        ("wrong type: max_tokens string", j(max_tokens="lots")),
        ("wrong type: temperature list", j(temperature=[1])),
        ("wrong type: content number", j(messages=[{"role": "user", "content": 42}])),
        ("wrong type: body null", b"null"),
        ("oversized max_tokens 1e9", j(max_tokens=10**9)),
        ("oversized max_tokens 2^64", j(max_tokens=2**64)),
        ("negative max_tokens", j(max_tokens=-5)),
        ("empty messages", j(messages=[])),
        (
            "invalid UTF-8 in body",
            b'{"messages": [{"role": "user", "content": "caf\xc3\x28 \xff\xfe"}], "max_tokens": 8}',
        ),
    ]


async def malformed(s):
    cases = malformed_cases()
    i = 0
    while not s.stop.is_set():
        # Keep malformed requests at 1 in N of all requests started.
        if (s.bad_sent + 1) * s.a.malformed_every > s.started + s.bad_sent + 1:
            await asyncio.sleep(0.2)
            continue
        kind, body = cases[i % len(cases)]
        i += 1
        s.bad_sent += 1
        c = s.bad_by_kind.setdefault(kind, Counter())
        try:
            st, b = await simple(s.host, s.port, "POST", "/v1/chat/completions", body, s.a.malformed_timeout)
            c.add(st)
            if not 400 <= st < 500 and len(s.bad_problems) < 10:
                s.bad_problems.append(f"{kind}: HTTP {st}: {b[:160]!r}")
        except Exception as e:  # noqa: BLE001
            reason = describe(e)
            c.add("hang (timeout)" if reason == "timeout" else "no response")
            if len(s.bad_problems) < 10:
                s.bad_problems.append(f"{kind}: {reason}")


async def disconnector(s, idx):
    rng = random.Random(1000 + idx)
    while not s.stop.is_set():
        s.started += 1
        body = chat_body(PROMPTS[rng.randrange(len(PROMPTS))], rng.randint(64, 256), seed=rng.randrange(1 << 30))
        reset = rng.random() < 0.5  # RST instead of FIN
        mode = rng.random()
        writer = r = None
        try:
            if mode < 0.15:
                # Send the request and go away before the response head.
                _, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), 10)
                data = json.dumps(body).encode()
                writer.write(
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
                )
                await writer.drain()
                await asyncio.sleep(rng.uniform(0, 0.3))
                s.disc.add("before the response head")
            else:
                r = await request(s.host, s.port, "POST", "/v1/chat/completions", body, 30)
                if r.status != 200:
                    s.disc.add(f"HTTP {r.status}")
                else:
                    want = rng.randint(0, 40)
                    got = 0
                    if want:
                        async for _t, data in r.sse(30):
                            got += 1
                            if got >= want or data == b"[DONE]":
                                break
                    if want == 0:
                        s.disc.add("right after the response head")
                    elif got >= want:
                        s.disc.add("mid-stream, after 1-40 events")
                    else:
                        s.disc.add("stream ended before the chosen point")
        except Exception as e:  # noqa: BLE001
            s.disc.add(f"error: {describe(e)[:60]}")
        finally:
            if r is not None:
                r.close(reset=reset)
            if writer is not None:
                writer.transport.abort() if reset else writer.close()
        await asyncio.sleep(rng.uniform(0, 1.0))


async def slowloris(s, idx):
    rng = random.Random(idx)
    await asyncio.sleep(rng.uniform(0, 3))  # stagger the connects
    trickle = b"X-Slow-Loris: " + b"a" * 4000
    while not s.stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), 10)
        except Exception as e:  # noqa: BLE001
            s.sl.add(f"connect failed: {type(e).__name__}")
            await asyncio.sleep(1)
            continue
        s.sl.add("connections opened")
        s.sl_open += 1
        s.sl_open_max = max(s.sl_open_max, s.sl_open)
        t = time.perf_counter()
        outcome = None
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
            await writer.drain()
            pos = 0
            while not s.stop.is_set():
                wait = rng.uniform(0.5, 1.5) * s.a.slowloris_interval
                try:
                    data = await asyncio.wait_for(reader.read(4096), wait)
                except asyncio.TimeoutError:
                    writer.write(trickle[pos % len(trickle) : pos % len(trickle) + 1])
                    pos += 1
                    await writer.drain()
                    continue
                if data:
                    status = data.split(b" ", 2)[1].decode("latin-1", "replace") if data.startswith(b"HTTP/") else "?"
                    outcome = f"server answered {status}, closed"
                    await asyncio.wait_for(reader.read(), 5)  # until close
                else:
                    outcome = "server closed (no answer)"
                break
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            outcome = f"server closed ({type(e).__name__})"
        finally:
            s.sl_open -= 1
            writer.transport.abort()
        if outcome:
            s.sl.add(outcome)
            s.sl_held.append(time.perf_counter() - t)


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sampler(s):
    while True:
        try:
            s.samples.append((time.perf_counter() - s.t0, proc_rss_kb(s.pid), proc_fds(s.pid)))
        except OSError:
            pass
        try:
            await asyncio.wait_for(s.stop.wait(), s.a.sample_every)
            return
        except asyncio.TimeoutError:
            pass


async def health_prober(s):
    while not s.stop.is_set():
        t = time.perf_counter()
        try:
            st, _ = await simple(s.host, s.port, "GET", "/health", None, s.a.health_timeout)
            s.health.append((t - s.t0, time.perf_counter() - t, st))
        except Exception as e:  # noqa: BLE001
            s.health.append((t - s.t0, time.perf_counter() - t, describe(e)))
        try:
            await asyncio.wait_for(s.stop.wait(), s.a.health_every)
        except asyncio.TimeoutError:
            pass


async def watch_server(s, proc):
    while not s.stop.is_set():
        if proc.poll() is not None:
            s.server_died = proc.returncode
            s.stop.set()
            return
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


async def wait_health(host, port, proc, timeout):
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with status {proc.returncode} before answering /health")
        try:
            st, _ = await simple(host, port, "GET", "/health", None, 2)
            if st == 200:
                return time.perf_counter() - t
        except Exception:  # noqa: BLE001
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"/health not 200 within {timeout} s")


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def run(a):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host = "127.0.0.1"
    port = a.port or free_port()
    cmd = [a.kiln, "serve", "-m", a.model, "--host", host, "--port", str(port), "--ctx", str(a.ctx),
           "--parallel", str(a.parallel)] + a.serve_arg
    if a.server_log:
        log_path, logf = a.server_log, open(a.server_log, "w")
    else:
        logf = tempfile.NamedTemporaryFile("w", prefix="kiln-soak-", suffix=".log", delete=False)
        log_path = logf.name
    log(f"starting: {' '.join(cmd)} (server log: {log_path})")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    s = Soak(a, host, port, proc.pid)
    s.server_died = None
    s.cmd, s.log_path = cmd, log_path
    try:
        t_ready = await wait_health(host, port, proc, a.start_timeout)
        log(f"server ready after {t_ready:.2f} s")
        sentences, long_tokens = await calibrate_long(s)
        log(f"long prompt: {sentences} notes, {long_tokens} tokens of text (chat template adds a few)")

        base_single, base_clean = [], []
        if a.baseline_seconds > 0:
            log(f"baseline: 1 stream alone for {a.baseline_seconds:g} s")
            await well_behaved(s, 0, base_single, time.perf_counter() + a.baseline_seconds)
        if a.clean_seconds > 0:
            log(f"baseline: {a.streams} streams, no hostile traffic, for {a.clean_seconds:g} s")
            dl = time.perf_counter() + a.clean_seconds
            await asyncio.gather(*(well_behaved(s, i, base_clean, dl) for i in range(a.streams)))
        base_ok, base_fail = s.wb_ok, dict(s.wb_fail)
        s.wb_ok, s.wb_fail, s.wb_tokens, s.started = 0, Counter(), 0, 0
        await asyncio.sleep(1)
        idle_fds = proc_fds(proc.pid)
        idle_rss = proc_rss_kb(proc.pid)

        log(f"mixed load for {a.duration:g} s: {a.streams} streams, {a.slowloris} slowloris, "
            f"{a.disconnectors} disconnectors, 1 in {a.malformed_every} malformed, a long prompt every {a.long_every:g} s")
        s.t0 = time.perf_counter()
        bg = [asyncio.create_task(c, name=c.__name__) for c in
              [sampler(s), health_prober(s), watch_server(s, proc), malformed(s), long_prompts(s, sentences)]]
        hostile = [asyncio.create_task(slowloris(s, i), name=f"slowloris {i}") for i in range(a.slowloris)]
        hostile += [asyncio.create_task(disconnector(s, i), name=f"disconnector {i}") for i in range(a.disconnectors)]
        wb = [asyncio.create_task(well_behaved(s, i, s.gaps), name=f"stream {i}") for i in range(a.streams)]

        async def progress():
            while not s.stop.is_set():
                try:
                    await asyncio.wait_for(s.stop.wait(), 60)
                except asyncio.TimeoutError:
                    last = s.samples[-1] if s.samples else (0, 0, 0)
                    log(f"t={time.perf_counter() - s.t0:.0f}s ok={s.wb_ok} failed={sum(s.wb_fail.values())} "
                        f"malformed={s.bad_sent} long={s.long_ok}/{len(s.long_info)} slowloris open={s.sl_open} "
                        f"rss={last[1] / 1024:.0f}MiB fds={last[2]}")

        prog = asyncio.create_task(progress())
        try:
            await asyncio.wait_for(s.stop.wait(), a.duration)
        except asyncio.TimeoutError:
            pass
        t_end = time.perf_counter() - s.t0
        if proc.poll() is None:
            s.samples.append((t_end, proc_rss_kb(proc.pid), proc_fds(proc.pid)))
        s.stop.set()
        prog.cancel()
        for t in hostile:
            t.cancel()
        log("load over; waiting for the well-behaved requests in flight")
        pending = [*wb, *bg, *hostile]
        while True:
            done, rest = await asyncio.wait(pending, timeout=10)
            if not rest:
                break
            health = "?"
            try:
                health = (await simple(host, port, "GET", "/health", None, 5))[1].decode()
            except Exception as e:  # noqa: BLE001
                health = describe(e)
            log(f"still waiting for {', '.join(sorted(t.get_name() for t in rest))} "
                f"(well-behaved requests run to their end); /health: {health}")
            pending = list(rest)
        t_drained = time.perf_counter() - s.t0

        # fds after the load: back to the idle count?
        after_fds = None
        if proc.poll() is None:
            for _ in range(30):
                after_fds = proc_fds(proc.pid)
                if after_fds <= idle_fds + 4:
                    break
                await asyncio.sleep(0.5)
            after_rss = proc_rss_kb(proc.pid)
        else:
            after_rss = None

        exit_code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "still running 30 s after SIGTERM (killed)"
        else:
            exit_code = proc.returncode
        summary = report(s, a, base_single, base_clean, base_ok, base_fail, idle_fds, idle_rss,
                         after_fds, after_rss, t_end, t_drained, long_tokens, exit_code)
        return summary
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logf.close()


def report(s, a, base_single, base_clean, base_ok, base_fail, idle_fds, idle_rss, after_fds, after_rss,
           t_end, t_drained, long_tokens, exit_code):
    out = []
    p = out.append
    p(f"## kiln soak: {a.duration:g} s of mixed load")
    p("")
    p(f"server: `{' '.join(s.cmd)}`; log `{s.log_path}`")
    p(f"load: {a.streams} well-behaved streams (max_tokens {a.max_tokens}, temperature 0.7), {a.slowloris} slowloris "
      f"connections, {a.disconnectors} disconnecting clients, 1 in {a.malformed_every} requests malformed, a "
      f"~{long_tokens}-token prompt (max_tokens 16) every {a.long_every:g} s")
    p("")
    if s.server_died is not None:
        p(f"**the server died during the run: exit status {s.server_died}**")
        p("")

    # well-behaved
    wb_failed = sum(s.wb_fail.values())
    long_failed = sum(s.long_fail.values())
    p("### Well-behaved requests")
    p("")
    p("| kind | completed | failed | notes |")
    p("|---|---:|---:|---|")
    p(f"| streams (baseline phases) | {base_ok} | {sum(base_fail.values())} | {base_fail or ''} |")
    reasons = "".join(f"; {k}: {v}" for k, v in s.wb_fail.items())
    p(f"| streams (mixed load) | {s.wb_ok} | {wb_failed} | {s.wb_tokens} tokens{reasons} |")
    lt = [x[1] for x in s.long_info if x[1] is not None]
    tt = [x[2] for x in s.long_info]
    pt = sorted({x[0] for x in s.long_info if x[0]})
    p(f"| long prompts | {s.long_ok} | {long_failed} | prompt tokens {pt[0] if pt else '?'}–{pt[-1] if pt else '?'}; "
      f"TTFT max {max(lt) if lt else float('nan'):.2f} s; total max {max(tt) if tt else float('nan'):.2f} s "
      f"{'; ' + ', '.join(f'{k}: {v}' for k, v in s.long_fail.items()) if s.long_fail else ''} |")
    for e in s.wb_fail_examples:
        p(f"- failure: {e}")
    p("")

    # gaps
    p("### Inter-token gap of the well-behaved streams (ms)")
    p("")
    p("| phase | gaps | p50 | p99 | max |")
    p("|---|---:|---:|---:|---:|")
    for name, g in [("1 stream alone (unloaded)", base_single), (f"{a.streams} streams, no hostile traffic", base_clean),
                    ("mixed load", s.gaps)]:
        p(f"| {name} | {len(g)} | {ms(pct(g, 50))} | {ms(pct(g, 99))} | {ms(max(g) if g else float('nan'))} |")
    p99 = pct(s.gaps, 99)
    r_single = p99 / pct(base_single, 99) if base_single else float("nan")
    r_clean = p99 / pct(base_clean, 99) if base_clean else float("nan")
    p50r = pct(s.gaps, 50) / pct(base_single, 50) if base_single else float("nan")
    p("")
    p(f"p99 loaded / unloaded: {r_single:.2f}x against 1 stream alone (p50 {p50r:.2f}x), "
      f"{r_clean:.2f}x against {a.streams} streams without hostile traffic")
    p("")

    # malformed
    p("### Malformed requests (each must be a 4xx)")
    p("")
    p("| kind | answers |")
    p("|---|---|")
    all_status = Counter()
    for kind, c in s.bad_by_kind.items():
        p(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items(), key=str))} |")
        for k, v in c.items():
            all_status.add(k, v)
    total_req = s.started + s.bad_sent
    p(f"| **all** ({s.bad_sent} of {total_req} requests, 1 in {total_req / max(1, s.bad_sent):.1f}) | "
      f"{', '.join(f'{k}: {v}' for k, v in sorted(all_status.items(), key=str))} |")
    for e in s.bad_problems:
        p(f"- problem: {e}")
    bad_ok = all(isinstance(k, int) and 400 <= k < 500 for k in all_status) and s.bad_sent > 0
    p("")

    # hostile clients
    p("### Hostile clients")
    p("")
    held = s.sl_held
    p(f"- slowloris: {', '.join(f'{k}: {v}' for k, v in s.sl.items())}; at most {s.sl_open_max} open at once; "
      f"held by the server p50 {pct(held, 50):.1f} s, max {max(held) if held else float('nan'):.1f} s")
    p(f"- disconnecting clients: {', '.join(f'{k}: {v}' for k, v in s.disc.items())}")
    p("")

    # resources
    ref_t = min(300.0, a.duration / 6)
    ref_label = "5 min" if ref_t == 300.0 else f"{ref_t:.0f} s (1/6 of the run, which is shorter than 30 min)"
    rs = [x for x in s.samples if x[1] is not None]
    ref = next((x for x in rs if x[0] >= ref_t - 0.5), rs[-1] if rs else None)
    end = rs[-1] if rs else None
    growth = (end[1] - ref[1]) / ref[1] * 100 if ref and end else float("nan")
    max_fds = max((x[2] for x in rs), default=0)
    max_rss = max((x[1] for x in rs), default=0)
    fd_bound = a.streams + a.slowloris + a.disconnectors + 2 + 64
    hl = [x[1] for x in s.health if isinstance(x[2], int)]
    hbad = Counter()
    for x in s.health:
        if x[2] != 200:
            hbad.add(x[2])
    p("### Server resources")
    p("")
    p("| measure | value |")
    p("|---|---|")
    p(f"| RSS idle, before the load | {idle_rss / 1024:.1f} MiB |")
    p(f"| RSS at {ref_label} | {ref[1] / 1024:.1f} MiB (t = {ref[0]:.0f} s) |" if ref else "| RSS ref | n/a |")
    p(f"| RSS at the end | {end[1] / 1024:.1f} MiB (t = {end[0]:.0f} s) |" if end else "| RSS end | n/a |")
    p(f"| RSS growth after {ref_label.split(' (')[0]} | {growth:+.1f}% |")
    p(f"| RSS max | {max_rss / 1024:.1f} MiB |")
    p(f"| RSS after the load | {after_rss / 1024:.1f} MiB |" if after_rss else "| RSS after the load | n/a |")
    p(f"| open fds: idle / max under load / after the load | {idle_fds} / {max_fds} / {after_fds} "
      f"(bound {fd_bound}: the connections this script opens + 64) |")
    p(f"| /health latency p50 / p99 / max ({len(s.health)} probes, every {a.health_every:g} s) | "
      f"{ms(pct(hl, 50))} / {ms(pct(hl, 99))} / {ms(max(hl) if hl else float('nan'))} ms |")
    p(f"| /health not 200 | {dict(hbad) or 0} |")
    p(f"| load time / drained at | {t_end:.0f} s / {t_drained:.0f} s |")
    p(f"| exit status after SIGTERM | {exit_code} |")
    p("")
    p("RSS / fds samples (t s: MiB, fds): " + ", ".join(f"{x[0]:.0f}: {x[1] / 1024:.0f}, {x[2]}" for x in rs[:: max(1, len(rs) // 20)]))
    p("")

    # bars
    gap_ratio = r_single if a.gap_baseline == "single" else r_clean
    bars = [
        ("0 failed well-behaved requests", f"{wb_failed} stream + {long_failed} long-prompt failures",
         wb_failed == 0 and long_failed == 0 and s.wb_ok > 0 and s.server_died is None),
        (f"p99 inter-token gap < 4x unloaded ({'1 stream alone' if a.gap_baseline == 'single' else f'{a.streams} clean streams'})",
         f"{ms(p99)} ms = {gap_ratio:.2f}x (other baseline: {r_clean if a.gap_baseline == 'single' else r_single:.2f}x)",
         gap_ratio < 4),
        (f"RSS growth < 10% after {ref_label.split(' (')[0]}", f"{growth:+.1f}%", growth < 10),
        ("fds bounded", f"max {max_fds} <= {fd_bound}; after the load {after_fds} vs idle {idle_fds}",
         max_fds <= fd_bound and after_fds is not None and after_fds <= idle_fds + 4),
        ("malformed requests: all 4xx, no 5xx, no hang", ", ".join(f"{k}: {v}" for k, v in sorted(all_status.items(), key=str)), bad_ok),
        ("/health always 200", f"{len(s.health) - sum(hbad.values())}/{len(s.health)}; p99 {ms(pct(hl, 99))} ms", not hbad),
    ]
    p("### Soak bar")
    p("")
    p("| bar | measured | result |")
    p("|---|---|---|")
    for name, val, ok in bars:
        p(f"| {name} | {val} | {'PASS' if ok else 'FAIL'} |")
    passed = all(b[2] for b in bars)
    p("")
    p(f"**{'PASS' if passed else 'FAIL'}**")
    return "\n".join(out), passed, {
        "wb_ok": s.wb_ok, "wb_failed": dict(s.wb_fail), "long_ok": s.long_ok, "long_failed": dict(s.long_fail),
        "gap_p50_single": pct(base_single, 50), "gap_p99_single": pct(base_single, 99),
        "gap_p50_clean": pct(base_clean, 50), "gap_p99_clean": pct(base_clean, 99),
        "gap_p50": pct(s.gaps, 50), "gap_p99": p99, "ratio_single": r_single, "ratio_clean": r_clean,
        "malformed": {k: {str(x): y for x, y in c.items()} for k, c in s.bad_by_kind.items()},
        "rss_ref_kb": ref[1] if ref else None, "rss_end_kb": end[1] if end else None, "rss_growth_pct": growth,
        "max_fds": max_fds, "idle_fds": idle_fds, "after_fds": after_fds, "health_p99": pct(hl, 99),
        "samples": s.samples, "slowloris": dict(s.sl), "disconnects": dict(s.disc), "passed": passed,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln", help="the kiln binary (default: %(default)s)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    ap.add_argument("--ctx", type=int, default=4608)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for kiln serve (repeat; e.g. --serve-arg=--header-timeout --serve-arg=5)")
    ap.add_argument("--duration", type=float, default=1800, help="seconds of mixed load (default: %(default)s)")
    ap.add_argument("--baseline-seconds", type=float, default=30, help="one stream alone, before the load")
    ap.add_argument("--clean-seconds", type=float, default=30,
                    help="the well-behaved streams without hostile traffic, before the load (0: skip)")
    ap.add_argument("--gap-baseline", choices=["single", "clean"], default="single",
                    help="the unloaded gap the 4x bar compares with (default: %(default)s)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--slowloris-interval", type=float, default=3.0, help="mean seconds between trickled bytes")
    ap.add_argument("--disconnectors", type=int, default=2)
    ap.add_argument("--malformed-every", type=int, default=20, help="1 in N requests is malformed")
    ap.add_argument("--malformed-timeout", type=float, default=10.0)
    ap.add_argument("--long-every", type=float, default=60.0, help="seconds between long prompts")
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--long-timeout", type=float, default=120.0, help="read timeout of a long-prompt request")
    ap.add_argument("--read-timeout", type=float, default=60.0,
                    help="most seconds a well-behaved stream may go without data (then it failed)")
    ap.add_argument("--sample-every", type=float, default=10.0, help="RSS/fd sampling period")
    ap.add_argument("--health-every", type=float, default=2.0, help="/health probe period")
    ap.add_argument("--health-timeout", type=float, default=10.0)
    ap.add_argument("--start-timeout", type=float, default=120.0)
    ap.add_argument("--server-log", help="file for the server's output (default: a temporary file)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers as JSON")
    a = ap.parse_args()
    if not os.path.exists(a.kiln):
        sys.exit(f"soak: {a.kiln} not found (cargo build --release, or --kiln PATH)")
    # A plain SIGTERM to this script (not to its process group) still stops the server: the
    # exception unwinds through run()'s cleanup.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        text, passed, raw = asyncio.run(run(a))
    except KeyboardInterrupt:
        sys.exit("soak: interrupted")
    print(text, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f, indent=1)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
