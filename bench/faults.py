#!/usr/bin/env python3
"""Fault injection for `kiln serve` (issue 26's fault bar), with SmolLM2 by default.

(a) kill -9 under load: starts the server, runs --streams streams (ignore_eos, long answers),
    kills the process with SIGKILL mid-stream. Every client must see an error (connection
    reset or a stream cut short without `[DONE]`) within --error-within seconds; none may hang
    (client timeout --client-timeout: a client that gets no data for that long counts as hung).
    Then restarts it while parallel-1 clients reconnect, and measures the time from process
    start to /health 200 and to the first successful chat answer (bar: --serve-within, 1 s).
(b) SIGTERM with --grace under load: half the streams are short (they can finish within the
    grace period), half long (they cannot). Each must finish normally, or end with an error
    event and `[DONE]`, within grace + --stream-slack; the process must exit 0 within grace +
    --exit-slack; new requests 0.3 s and grace/2 after the signal must be refused (connection
    refused or 503).
(c) SIGTERM, then a second SIGTERM 0.5 s later (with --grace 30 and long streams running): the
    process must exit within 1 s of the second signal with a non-zero status, and the clients
    see errors, not hangs.

Prints a markdown table with pass/fail per bar; exit status 0 when all pass. Dependency-free
(raw asyncio HTTP/1.1, `Connection: close`).

    cargo build --release
    python3 bench/faults.py                                  # target/release/kiln, SmolLM2
    python3 bench/faults.py --kiln target/debug/kiln --only bc
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_MODEL = os.path.expanduser("~/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf")
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 client (one request per connection, `Connection: close`)
# ---------------------------------------------------------------------------------------------


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_http import Response, request, simple, describe  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------


def log(msg):
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


class Server:
    """`kiln serve` as a child process; its stderr lines are kept with their arrival times."""

    def __init__(self, a, port, extra, logf):
        self.cmd = [a.kiln, "serve", "-m", a.model, "--host", HOST, "--port", str(port),
                    "--parallel", str(a.parallel)] + extra + a.serve_arg
        self.port, self.logf, self.proc, self.lines = port, logf, None, []

    def start(self):
        self.logf.write(f"\n$ {' '.join(self.cmd)}\n")
        self.logf.flush()
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append((time.perf_counter(), line))
            self.logf.write(line + "\n")
            self.logf.flush()

    def line_time(self, needle):
        return next((t for t, line in self.lines if needle in line), None)

    async def wait_exit(self, timeout):
        """Polls every 5 ms; (exit status, perf_counter time seen) or (None, None)."""
        t = time.perf_counter()
        while time.perf_counter() - t < timeout:
            if self.proc.poll() is not None:
                return self.proc.returncode, time.perf_counter()
            await asyncio.sleep(0.005)
        return None, None

    async def wait_health(self, timeout):
        t = time.perf_counter()
        while time.perf_counter() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode} before /health answered")
            try:
                if (await simple(HOST, self.port, "GET", "/health", None, 2))[0] == 200:
                    return
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError(f"/health not 200 within {timeout} s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def chat(prompt, max_tokens, stream=True, ignore_eos=True, seed=1):
    b = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.7,
         "seed": seed, "stream": stream}
    if ignore_eos:
        b["ignore_eos"] = True  # llama.cpp's field: the answer runs to max_tokens
    return b


PROMPTS = ["Tell me a long story about a robot.", "Describe the water cycle in detail.",
           "Write a long poem about the sea.", "Explain how a kiln works, step by step."]


class Stream:
    """One streamed chat. outcome: finished | error event | incomplete (EOF, no [DONE]) |
    connection reset | hang | HTTP nnn | connect failed. t_end: when the outcome was known."""

    def __init__(self, idx, max_tokens):
        self.idx, self.max_tokens = idx, max_tokens
        self.content = 0
        self.outcome = self.detail = None
        self.done = False
        self.t_end = None

    async def run(self, port, timeout):
        try:
            r = await request(HOST, port, "POST", "/v1/chat/completions",
                              chat(PROMPTS[self.idx % len(PROMPTS)], self.max_tokens, seed=self.idx), timeout)
        except Exception as e:  # noqa: BLE001
            return self._end("connect failed", describe(e))
        try:
            if r.status != 200:
                return self._end(f"HTTP {r.status}", (await r.body(timeout))[:160].decode("utf-8", "replace"))
            finish = err = None
            async for _t, data in r.sse(timeout):
                if data == b"[DONE]":
                    self.done = True
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    err = str(ev["error"].get("message"))[:100]
                for c in ev.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        self.content += 1
                    finish = c.get("finish_reason") or finish
            if err and self.done:
                return self._end("error event", err)
            if self.done and finish:
                return self._end("finished", finish)
            return self._end("incomplete", f"EOF without [DONE] (error event: {err}, finish: {finish})")
        except asyncio.TimeoutError:
            return self._end("hang", f"no data for {timeout:g} s")
        except asyncio.IncompleteReadError:
            return self._end("incomplete", "connection closed mid-response")
        except (ConnectionError, OSError) as e:
            return self._end("connection reset", describe(e))
        except Exception as e:  # noqa: BLE001 - e.g. an unparsable event
            return self._end("client error", describe(e))
        finally:
            r.close()

    def _end(self, outcome, detail):
        self.outcome, self.detail, self.t_end = outcome, detail, time.perf_counter()
        return self


async def start_streams(port, lengths, timeout, min_chunks, wait_s):
    """Starts one stream per max_tokens in `lengths`; returns once each has `min_chunks` content
    chunks (or ended, or wait_s passed)."""
    streams = [Stream(i, n) for i, n in enumerate(lengths)]
    tasks = [asyncio.create_task(s.run(port, timeout)) for s in streams]
    t = time.perf_counter()
    while time.perf_counter() - t < wait_s:
        if all(s.content >= min_chunks or s.outcome for s in streams):
            break
        await asyncio.sleep(0.02)
    return streams, tasks


def outcomes(streams):
    c = {}
    for s in streams:
        c[s.outcome] = c.get(s.outcome, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=str))


async def try_new_request(port, timeout=3.0):
    """A new chat during a drain: 'refused' (connection refused / 503) or what happened instead."""
    try:
        st, b = await simple(HOST, port, "POST", "/v1/chat/completions",
                             chat("Hi", 4, stream=False, ignore_eos=False), timeout)
        return ("refused (503)" if st == 503 else f"HTTP {st}"), st == 503
    except ConnectionRefusedError:
        return "refused (connection refused)", True
    except asyncio.TimeoutError:
        return "hang (no answer in 3 s)", False
    except Exception as e:  # noqa: BLE001
        # Accepted and then closed without an answer: not served, not a hang.
        return f"closed without an answer ({describe(e)[:60]})", True


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


async def scenario_kill(a, port, logf, rows):
    log("(a) kill -9 under load, then restart")
    srv = Server(a, port, [], logf).start()
    try:
        await srv.wait_health(a.start_timeout)
        streams, tasks = await start_streams(port, [a.long_tokens] * a.streams, a.client_timeout, 3, a.progress_wait)
        running = sum(1 for s in streams if s.outcome is None)
        t_kill = time.perf_counter()
        os.kill(srv.proc.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
        await srv.wait_exit(5)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    lat = [s.t_end - t_kill for s in streams]
    ok = all(s.outcome in ("incomplete", "connection reset", "error event") for s in streams) \
        and max(lat) <= a.error_within and running == len(streams)
    rows.append(("a: kill -9", f"all {a.streams} mid-stream clients see an error (no hang, {a.client_timeout:g} s "
                 f"client timeouts) within {a.error_within:g} s",
                 f"{running} streaming at the kill; {outcomes(streams)}; seen after max {max(lat) * 1000:.0f} ms", ok))

    # Restart, with clients reconnecting at once (parallel - 1 of them: one slot stays free for
    # the probe, so the probe times the server, not a queue).
    t_health = t_chat = None
    recovered = []

    async def poll_health():
        nonlocal t_health
        while time.perf_counter() - srv2.t_start < a.start_timeout:
            try:
                if (await simple(HOST, port, "GET", "/health", None, 2))[0] == 200:
                    t_health = time.perf_counter() - srv2.t_start
                    return
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(0.005)

    async def poll_chat():
        nonlocal t_chat
        while time.perf_counter() - srv2.t_start < a.start_timeout:
            try:
                st, b = await simple(HOST, port, "POST", "/v1/chat/completions",
                                     chat("What is the capital of France?", 4, stream=False, ignore_eos=False), 10)
                if st == 200 and json.loads(b)["choices"][0]["message"]["content"] is not None:
                    t_chat = time.perf_counter() - srv2.t_start
                    return
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(0.005)

    async def reconnecting(i):
        while time.perf_counter() - srv2.t_start < a.start_timeout:
            s = await Stream(100 + i, 16).run(port, a.client_timeout)
            if s.outcome == "finished":
                recovered.append(s.t_end - srv2.t_start)
                return
            await asyncio.sleep(0.05)

    srv2 = Server(a, port, [], logf).start()
    try:
        await asyncio.gather(poll_health(), poll_chat(), *(reconnecting(i) for i in range(a.restart_clients)))
        t_line = srv2.line_time("kiln: serving")
        t_line = t_line - srv2.t_start if t_line else None
    finally:
        srv2.stop()
    fmt = lambda x: "never" if x is None else f"{x:.3f} s"  # noqa: E731
    rows.append(("a: restart", f"/health 200 within {a.serve_within:g} s of process start",
                 f"{fmt(t_health)} ('serving' logged at {fmt(t_line)})",
                 t_health is not None and t_health <= a.serve_within))
    rows.append(("a: restart", f"first chat answer (max_tokens 4) within {a.serve_within:g} s of process start, "
                 f"{a.restart_clients} clients reconnecting meanwhile",
                 f"{fmt(t_chat)} ({fmt(None if t_chat is None or t_health is None else t_chat - t_health)} after "
                 f"/health 200); reconnecting clients served: {len(recovered)}/{a.restart_clients}, "
                 f"last after {fmt(max(recovered) if recovered else None)}",
                 t_chat is not None and t_chat <= a.serve_within and len(recovered) == a.restart_clients))


async def scenario_grace(a, port, logf, rows):
    g = a.grace
    log(f"(b) SIGTERM with --grace {g:g} under load")
    srv = Server(a, port, ["--grace", f"{g:g}"], logf).start()
    try:
        await srv.wait_health(a.start_timeout)
        half = a.streams // 2
        lengths = [a.short_tokens] * half + [a.long_tokens] * (a.streams - half)
        streams, tasks = await start_streams(port, lengths, a.client_timeout, 3, a.progress_wait)
        running = sum(1 for s in streams if s.outcome is None)
        t_term = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)

        async def probes():
            res = []
            for at in (0.3, g / 2):
                await asyncio.sleep(max(0.0, t_term + at - time.perf_counter()))
                res.append((at, *(await try_new_request(port))))
            return res

        probe_task = asyncio.create_task(probes())
        rc, t_exit = await srv.wait_exit(g + a.exit_slack + 10)
        await asyncio.gather(*tasks)
        probe = await probe_task
    finally:
        srv.stop()
    late = [s for s in streams if s.t_end - t_term > g + a.stream_slack]
    good = [s for s in streams if s.outcome in ("finished", "error event")]
    ends = [s.t_end - t_term for s in streams]
    rows.append(("b: SIGTERM, --grace %g" % g,
                 f"running streams finish, or end with an error event + [DONE], within grace (+{a.stream_slack:g} s)",
                 f"{running} streaming at SIGTERM ({half} of max_tokens {a.short_tokens}, {a.streams - half} of "
                 f"{a.long_tokens}); {outcomes(streams)}; last ended {max(ends):.2f} s after SIGTERM",
                 len(good) == len(streams) and not late))
    t_ex = None if t_exit is None else t_exit - t_term
    rows.append(("b: SIGTERM, --grace %g" % g, f"exits 0 within grace + {a.exit_slack:g} s",
                 f"status {rc}, {'still running' if t_ex is None else f'{t_ex:.2f} s'} after SIGTERM",
                 rc == 0 and t_ex is not None and t_ex <= g + a.exit_slack))
    rows.append(("b: SIGTERM, --grace %g" % g, "new requests refused during the drain",
                 "; ".join(f"+{at:g} s: {what}" for at, what, _ in probe), all(ok for _, _, ok in probe)))


async def scenario_double(a, port, logf, rows):
    log("(c) SIGTERM, then a second SIGTERM 0.5 s later")
    srv = Server(a, port, ["--grace", "30"], logf).start()
    try:
        await srv.wait_health(a.start_timeout)
        streams, tasks = await start_streams(port, [a.long_tokens] * a.streams, a.client_timeout, 3, a.progress_wait)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        alive = srv.proc.poll() is None
        t2 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        rc, t_exit = await srv.wait_exit(10)
        await asyncio.gather(*tasks)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
    t_ex = None if t_exit is None else t_exit - t2
    rows.append(("c: second SIGTERM", "exits within 1 s of the second signal, non-zero status",
                 f"{'running' if alive else 'already exited'} at the second signal; status {rc}, "
                 f"{'no exit in 10 s' if t_ex is None else f'{t_ex * 1000:.0f} ms'} after it",
                 alive and rc not in (None, 0) and t_ex is not None and t_ex <= 1.0))
    lat = [s.t_end - t2 for s in streams]
    rows.append(("c: second SIGTERM", f"clients see an error, not a hang, within {a.error_within:g} s",
                 f"{outcomes(streams)}; max {max(lat) * 1000:.0f} ms after the second signal",
                 all(s.outcome != "hang" and s.outcome != "finished" for s in streams) and max(lat) <= a.error_within))


async def run(a):
    port = a.port or free_port()
    if a.server_log:
        logf = open(a.server_log, "w")
    else:
        logf = tempfile.NamedTemporaryFile("w", prefix="kiln-faults-", suffix=".log", delete=False)
    log(f"server output: {logf.name}")
    rows = []
    try:
        for key, fn in (("a", scenario_kill), ("b", scenario_grace), ("c", scenario_double)):
            if key in a.only:
                try:
                    await fn(a, port, logf, rows)
                except Exception as e:  # noqa: BLE001
                    rows.append((key, "scenario ran", f"{type(e).__name__}: {e}", False))
    finally:
        logf.close()
    return rows, logf.name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln", help="the kiln binary (default: %(default)s)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="extra kiln serve argument (repeat)")
    ap.add_argument("--streams", type=int, default=8, help="streams under load")
    ap.add_argument("--long-tokens", type=int, default=3000, help="max_tokens of the streams that outlive the signal")
    ap.add_argument("--short-tokens", type=int, default=24, help="max_tokens of (b)'s streams that finish within grace")
    ap.add_argument("--grace", type=float, default=5)
    ap.add_argument("--client-timeout", type=float, default=10, help="a client waiting this long for data hangs")
    ap.add_argument("--error-within", type=float, default=3, help="seconds within which a client must see its error")
    ap.add_argument("--serve-within", type=float, default=1, help="restart bar: seconds from process start")
    ap.add_argument("--restart-clients", type=int, help="clients reconnecting during the restart (default: parallel - 1)")
    ap.add_argument("--exit-slack", type=float, default=3, help="(b): exit within grace + this")
    ap.add_argument("--stream-slack", type=float, default=1, help="(b): streams end within grace + this")
    ap.add_argument("--progress-wait", type=float, default=120, help="most seconds to wait for the streams to start")
    ap.add_argument("--start-timeout", type=float, default=60)
    ap.add_argument("--only", default="abc", help="scenarios to run, e.g. 'ac' (default: abc)")
    ap.add_argument("--server-log", help="file for the servers' output (default: a temporary file)")
    a = ap.parse_args()
    if a.restart_clients is None:
        a.restart_clients = max(0, a.parallel - 1)
    if not os.path.exists(a.kiln):
        sys.exit(f"faults: {a.kiln} not found (cargo build --release, or --kiln PATH)")
    rows, log_path = asyncio.run(run(a))
    print("## kiln fault injection")
    print()
    print(f"`{a.kiln} serve -m {a.model} --parallel {a.parallel}`; server output in `{log_path}`")
    print()
    print("| scenario | bar | measured | result |")
    print("|---|---|---|---|")
    for name, bar, val, ok in rows:
        print(f"| {name} | {bar} | {val} | {'PASS' if ok else 'FAIL'} |")
    passed = all(r[3] for r in rows)
    print()
    print(f"**{'PASS' if passed else 'FAIL'}**")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
