"""A minimal HTTP/1.1 client over asyncio (one request per connection, `Connection: close`),
shared by bench/soak.py and bench/faults.py: the openai package's HTTP stack is not what they
test, and raw sockets let them send malformed and slow requests too."""

import asyncio
import json
import time


class Response:
    def __init__(self, reader, writer, status, headers):
        self.reader, self.writer, self.status, self.headers = reader, writer, status, headers

    def close(self, reset=False):
        try:
            if reset:
                self.writer.transport.abort()
            else:
                self.writer.close()
        except Exception:  # noqa: BLE001
            pass

    async def chunks(self, timeout):
        """The body's pieces as they arrive; each read must complete within `timeout`."""
        r = self.reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await asyncio.wait_for(r.readuntil(b"\r\n"), timeout)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers, up to the empty line; a server that closes here is fine.
                    try:
                        while (await asyncio.wait_for(r.readuntil(b"\r\n"), timeout)) != b"\r\n":
                            pass
                    except asyncio.IncompleteReadError:
                        pass
                    return
                data = await asyncio.wait_for(r.readexactly(size), timeout)
                await asyncio.wait_for(r.readexactly(2), timeout)
                yield data
        elif "content-length" in self.headers:
            n = int(self.headers["content-length"])
            if n:
                yield await asyncio.wait_for(r.readexactly(n), timeout)
        else:
            while True:
                data = await asyncio.wait_for(r.read(65536), timeout)
                if not data:
                    return
                yield data

    async def body(self, timeout):
        parts = []
        async for c in self.chunks(timeout):
            parts.append(c)
        return b"".join(parts)

    async def sse(self, timeout):
        """(arrival time, payload) of every `data:` line; comments (keep-alives) are skipped, but
        `timeout` seconds with nothing but keep-alives is a timeout."""
        buf = b""
        last = time.perf_counter()
        async for c in self.chunks(timeout):
            buf += c.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                t = time.perf_counter()
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        last = t
                        yield t, line[5:].strip()
            if time.perf_counter() - last > timeout:
                raise asyncio.TimeoutError  # only keep-alive comments for `timeout` seconds


async def request(host, port, method, path, body=None, timeout=10.0, content_type="application/json"):
    """Sends a request and reads the response head; the caller reads the body and closes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        if body is not None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + (body or b""))
        await asyncio.wait_for(writer.drain(), timeout)
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except BaseException:
        writer.transport.abort()
        raise
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return Response(reader, writer, status, headers)


async def simple(host, port, method, path, body=None, timeout=10.0, content_type="application/json"):
    """(status, body bytes) of a whole request, within `timeout` overall."""

    async def go():
        r = await request(host, port, method, path, body, timeout, content_type)
        try:
            return r.status, await r.body(timeout)
        finally:
            r.close()

    return await asyncio.wait_for(go(), timeout)


def describe(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed mid-response"
    return f"{type(e).__name__}: {e}".strip()


# The chat prompts the load scripts cycle through (soak.py, loadtest.py).
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "Name five animals that live in the ocean.",
    "What are the three primary colors?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Tell me a short story about a robot.",
    "What is 12 times 12?",
    "Describe the water cycle.",
    "List the planets of the solar system.",
    "What is a prime number?",
]
