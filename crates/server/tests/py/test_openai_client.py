"""Drives a running `kiln serve` with the official openai Python client.

Run by crates/server/tests/server.rs, which starts the server and passes
KILN_BASE_URL, KILN_API_KEY, KILN_MODEL (and KILN_EXPECT_PARIS=1 for SmolLM2).
Prints one line per check and "ALL PASSED" at the end; exits non-zero on the first failure.
"""

import os
import sys

import openai

BASE = os.environ["KILN_BASE_URL"]
KEY = os.environ["KILN_API_KEY"]
MODEL = os.environ["KILN_MODEL"]
EXPECT_PARIS = os.environ.get("KILN_EXPECT_PARIS") == "1"

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def expect_error(name, exc_type, fn):
    try:
        fn()
    except exc_type as e:
        body = getattr(e, "body", None)
        check(name, isinstance(body, dict) and "message" in body, f"error body {body!r}")
        return
    except Exception as e:  # noqa: BLE001 - report which error came instead
        check(name, False, f"expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    check(name, False, f"expected {exc_type.__name__}, got success")


models = client.models.list()
check("models.list", [m.id for m in models.data] == [MODEL], [m.id for m in models.data])
check("models.retrieve", client.models.retrieve(MODEL).id == MODEL)

greedy = dict(model=MODEL, temperature=0, max_tokens=24)
r = client.chat.completions.create(messages=QUESTION, **greedy)
text = r.choices[0].message.content
check("chat non-stream", r.object == "chat.completion" and r.choices[0].message.role == "assistant" and text, r)
check("chat finish_reason", r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
check(
    "chat usage",
    r.usage.prompt_tokens > 0
    and 0 < r.usage.completion_tokens <= 24
    and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
    r.usage,
)
if EXPECT_PARIS:
    check("answer mentions Paris", "Paris" in text, text)

chunks = list(
    client.chat.completions.create(messages=QUESTION, stream=True, stream_options={"include_usage": True}, **greedy)
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("chat stream == non-stream (greedy)", streamed == text, f"{streamed!r} vs {text!r}")
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("chat stream finish_reason", finishes == [r.choices[0].finish_reason], finishes)
check("chat stream usage", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens)

c = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=16)
check("completions", c.object == "text_completion" and c.choices[0].text and c.usage.completion_tokens > 0, c)
cs = list(client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=16, stream=True))
check("completions stream == non-stream", "".join(x.choices[0].text for x in cs) == c.choices[0].text)

# Stop: cut the greedy completion before a piece of its own text.
full = c.choices[0].text
stop = full[len(full) // 2 : len(full) // 2 + 2]
cut = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=16, stop=[stop])
check(
    "stop string",
    cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop",
    f"{cut.choices[0].text!r} / {full!r} / stop {stop!r}",
)

# An open question, so that different seeds surely give different texts.
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
sampled = dict(model=MODEL, messages=STORY, temperature=1.0, max_tokens=20)
a = client.chat.completions.create(seed=1234, **sampled).choices[0].message.content
b = client.chat.completions.create(seed=1234, **sampled).choices[0].message.content
check("seed reproducible", a == b, f"{a!r} vs {b!r}")
d = [client.chat.completions.create(seed=s, **sampled).choices[0].message.content for s in (1, 2, 3)]
check("different seeds differ", len({a, *d}) > 1, d)

lp = client.chat.completions.create(messages=QUESTION, logprobs=True, top_logprobs=2, **greedy)
content = lp.choices[0].logprobs.content
check("logprobs", len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content))
check("logprobs greedy = top-1", all(t.token == t.top_logprobs[0].token and t.logprob <= 0 for t in content))

pen = client.chat.completions.create(messages=QUESTION, presence_penalty=1.5, frequency_penalty=1.0, **greedy)
check("penalties accepted", pen.choices[0].message.content)

expect_error("empty messages -> 400", openai.BadRequestError, lambda: client.chat.completions.create(model=MODEL, messages=[]))
expect_error(
    "max_tokens 0 -> 400",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0),
)
expect_error(
    "huge max_tokens -> 400",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**7),
)
expect_error(
    "prompt longer than the context -> 400",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 2000}]),
)
expect_error(
    "unknown model -> 404",
    openai.NotFoundError,
    lambda: client.chat.completions.create(model="gpt-4o", messages=QUESTION),
)
expect_error(
    "wrong type -> 400",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"temperature": "hot"}),
)
bad_key = openai.OpenAI(base_url=BASE, api_key="not-the-key", max_retries=0)
expect_error("wrong API key -> 401", openai.AuthenticationError, lambda: bad_key.models.list())

again = client.chat.completions.create(messages=QUESTION, **greedy).choices[0].message.content
check("still serving after errors", again == text, f"{again!r} vs {text!r}")
print("ALL PASSED")
