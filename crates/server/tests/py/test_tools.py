"""Function calling (`tools`, `tool_choice`) of a running `kiln serve`, driven with the official openai
Python client; call arguments checked with `jsonschema`.

Run by crates/server/tests/tools.rs, which starts the server and passes KILN_BASE_URL,
KILN_API_KEY, KILN_MODEL and KILN_FORMAT: `hermes` (Qwen2.5's `<tool_call>` template) or `llama3`
(Llama 3.1's JSON calls, whose template takes one call per assistant turn). KILN_MAX_TOKENS
(default 256) caps each turn-1 answer.

The models are random-weight synth models: they never call a tool by themselves, so calls are
forced with `tool_choice` "required" or a named function, whose grammar makes every call valid.
Checked: a two-turn agent loop (calls, tool results, a text answer), non-streamed and streamed
(deltas accumulated by index as OpenAI's docs show); "required" over 10 seeds at temperature 1;
"auto" never fails; the requests that must be refused with a 400 naming the field.
Prints one line per check and "ALL PASSED" at the end; exits non-zero on a failure.
"""

import concurrent.futures
import json
import os
import sys
import urllib.error
import urllib.request

import openai
from jsonschema import Draft202012Validator

BASE = os.environ["KILN_BASE_URL"]
KEY = os.environ["KILN_API_KEY"]
MODEL = os.environ["KILN_MODEL"]
FORMAT = os.environ.get("KILN_FORMAT", "hermes")
MAX_TOKENS = int(os.environ.get("KILN_MAX_TOKENS", "256"))
WORKERS = 4

if FORMAT not in ("hermes", "llama3"):
    print(f"FAIL KILN_FORMAT must be hermes or llama3, got {FORMAT!r}")
    sys.exit(2)

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=600)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def short(text, n=200):
    text = repr(text)
    return text if len(text) <= n else text[: n - 3] + "..."


TIMEZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                # maxLength: a random-weight model would otherwise write a city name until max_tokens.
                "properties": {"city": {"type": "string", "description": "The city name.", "maxLength": 24}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "enum": TIMEZONES}},
                "required": ["timezone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
for schema in SCHEMAS.values():
    Draft202012Validator.check_schema(schema)
NAMES = set(SCHEMAS)
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
RESULT = '{"temp_c": 21}'


def call_problems(calls, allowed):
    """What is wrong with a list of OpenAI tool calls (dicts), or None."""
    if not calls:
        return "no tool_calls"
    ids = [c.get("id") for c in calls]
    if not all(isinstance(i, str) and i for i in ids):
        return f"a call without an id: {ids}"
    if len(set(ids)) != len(ids):
        return f"ids not unique: {ids}"
    for c in calls:
        if c.get("type") != "function":
            return f"type {c.get('type')!r}"
        f = c.get("function") or {}
        name, args = f.get("name"), f.get("arguments")
        if name not in allowed:
            return f"function {name!r} is not among {sorted(allowed)}"
        try:
            value = json.loads(args)
        except (TypeError, ValueError) as e:
            return f"{name}: arguments are not JSON ({e}): {short(args)}"
        errors = list(Draft202012Validator(SCHEMAS[name]).iter_errors(value))
        if errors:
            return f"{name}: arguments {short(args)} invalid: {errors[0].message}"
    return None


def as_dicts(tool_calls):
    return [tc.model_dump(exclude_none=True) for tc in tool_calls or []]


def summary(calls):
    return ", ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)


def tool_messages(calls):
    return [{"role": "tool", "tool_call_id": c["id"], "content": RESULT} for c in calls]


def turn1(tool_choice, seed, stream=False, max_tokens=MAX_TOKENS, parallel=False):
    """Turn 1 of the loop. A forced call is one call (parallel_tool_calls false) unless `parallel`:
    with parallel calls a random-weight model may chain calls until max_tokens (then `length`)."""
    extra = {} if parallel or tool_choice == "auto" else {"parallel_tool_calls": False}
    return client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        stream=stream,
        **extra,
    )


def accumulate(stream):
    """Content, tool calls (accumulated by index), the finish reasons, and the last chunk with choices."""
    content, calls, finishes, last = "", {}, [], None
    first_deltas = {}
    for chunk in stream:
        if not chunk.choices:
            continue
        last = chunk
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                first_deltas[tc.index] = tc
                calls[tc.index] = {"id": tc.id, "type": tc.type, "function": {"name": tc.function.name, "arguments": ""}}
            slot = calls[tc.index]
            if tc.function and tc.function.arguments:
                slot["function"]["arguments"] += tc.function.arguments
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return content, [calls[i] for i in sorted(calls)], finishes, last, first_deltas


def history_for_turn2(label, message, calls):
    """The conversation after turn 1: the assistant message as the client returned it and one tool
    result per call. Llama 3.1's template takes one call per assistant turn (it raises
    "This model only supports single tool-calls at once!" on more): with several calls, that must
    be a 400, and the loop goes on with the first call only."""
    if FORMAT == "llama3" and len(calls) > 1:
        try:
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION + [message] + tool_messages(calls),
                tools=TOOLS,
                tool_choice="none",
                max_tokens=8,
            )
            check(f"{label}: {len(calls)} calls in one llama3 assistant turn -> 400", False, "answered 200")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            check(
                f"{label}: {len(calls)} calls in one llama3 assistant turn -> 400 (template: single calls only)",
                body.get("param") == "messages" and "single tool-call" in str(body.get("message")),
                f"error body {body!r}",
            )
        calls = calls[:1]
        message = dict(message, tool_calls=calls)
    return QUESTION + [message] + tool_messages(calls)


def turn2(label, history, stream=False):
    req = dict(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=32, temperature=1.0, seed=5)
    if not stream:
        r = client.chat.completions.create(**req)
        c = r.choices[0]
        check(
            f"{label}: turn 2 (tool results, tool_choice none) is a text answer",
            c.finish_reason in ("stop", "length") and not c.message.tool_calls and isinstance(c.message.content, str),
            f"finish {c.finish_reason!r}, message {c.message!r}",
        )
        print(f"     turn 2: {short(c.message.content, 100)} ({r.usage.prompt_tokens} prompt tokens)")
    else:
        content, calls, finishes, _, _ = accumulate(client.chat.completions.create(stream=True, **req))
        check(
            f"{label}: turn 2 streamed (tool results, tool_choice none) is a text answer",
            finishes in (["stop"], ["length"]) and not calls,
            f"finishes {finishes}, calls {calls}, content {short(content)}",
        )


# ---------------------------------------------------------------------------------------------
# The agent loop, not streamed: "required" (any tool) and a named function (exactly that one).

for label, choice, allowed, seed in (
    ("loop required", "required", NAMES, 11),
    ("loop named get_weather", NAMED, {"get_weather"}, 12),
):
    r = turn1(choice, seed)
    c = r.choices[0]
    check(f"{label}: finish_reason tool_calls", c.finish_reason == "tool_calls", f"{c.finish_reason!r}: {c.message!r}")
    calls = as_dicts(c.message.tool_calls)
    problem = call_problems(calls, allowed)
    check(f"{label}: {len(calls)} valid call(s): {short(summary(calls), 160)}", problem is None, problem)
    if choice is NAMED:
        check(f"{label}: exactly one call, of get_weather", len(calls) == 1, summary(calls))
    message = c.message.model_dump(exclude_none=True)
    turn2(label, history_for_turn2(label, message, calls))

# The same by hand-built messages, with content null (as OpenAI itself sends it back).
r = turn1(NAMED, 13)
calls = as_dicts(r.choices[0].message.tool_calls)
check("hand-built history: one valid call", call_problems(calls, {"get_weather"}) is None and len(calls) == 1, summary(calls))
hand = {"role": "assistant", "content": None, "tool_calls": calls}
turn2("hand-built history", QUESTION + [hand] + tool_messages(calls))

# ---------------------------------------------------------------------------------------------
# The same loop streamed: deltas accumulated by index; the same calls as the non-streamed answer
# of the same seed.

for label, choice, allowed, seed in (
    ("stream required", "required", NAMES, 21),
    ("stream named get_weather", NAMED, {"get_weather"}, 22),
):
    whole = turn1(choice, seed).choices[0]
    content, calls, finishes, last, first = accumulate(turn1(choice, seed, stream=True))
    check(f"{label}: one finish_reason, tool_calls", finishes == ["tool_calls"], f"{finishes}")
    check(
        f"{label}: the last chunk's finish_reason is tool_calls",
        last is not None and last.choices[0].finish_reason == "tool_calls",
        repr(last),
    )
    bad_first = [
        i for i, tc in first.items() if not (tc.id and tc.type == "function" and tc.function and tc.function.name)
    ]
    check(f"{label}: each call's first delta has id, type and name", not bad_first, f"{[first[i] for i in bad_first]}")
    problem = call_problems(calls, allowed)
    check(f"{label}: {len(calls)} valid call(s): {short(summary(calls), 160)}", problem is None, problem)
    if choice is NAMED:
        check(f"{label}: exactly one call, of get_weather", len(calls) == 1, summary(calls))
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in as_dicts(whole.message.tool_calls)]
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    check(f"{label}: the same calls as non-streamed (seed {seed})", got == want, f"{got} vs {want}")
    message = {"role": "assistant", "content": content or None, "tool_calls": calls}
    turn2(label, history_for_turn2(label, message, calls), stream=True)

# ---------------------------------------------------------------------------------------------
# "required" at temperature 1 over 10 seeds: always at least one valid call.


def required_case(seed):
    try:
        c = turn1("required", seed).choices[0]
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        return f"{type(e).__name__}: {e}"
    calls = as_dicts(c.message.tool_calls)
    if c.finish_reason != "tool_calls":
        return f"finish_reason {c.finish_reason!r}, content {short(c.message.content)}"
    return call_problems(calls, NAMES) or f"ok: {short(summary(calls), 120)}"


seeds = list(range(100, 110))
with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
    outcomes = list(pool.map(required_case, seeds))
for seed, outcome in zip(seeds, outcomes):
    print(f"     required seed={seed}: {outcome}")
failed = [s for s, o in zip(seeds, outcomes) if not o.startswith("ok")]
check(f"required x{len(seeds)} seeds at temperature 1: every answer has valid calls", not failed, f"seeds {failed}")


# "required" with parallel calls allowed: every complete call valid; `tool_calls` when the model
# ended, `length` (never `tool_calls`) when max_tokens cut it.
def parallel_case(seed):
    r = turn1("required", seed, parallel=True)
    c = r.choices[0]
    calls = as_dicts(c.message.tool_calls)
    if c.finish_reason == "tool_calls" and calls:
        return call_problems(calls, NAMES) or f"ok: {len(calls)} calls"
    if c.finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS:
        return call_problems(calls, NAMES) or f"ok: cut after {len(calls)} calls"
    return f"finish_reason {c.finish_reason!r} after {r.usage.completion_tokens} tokens, {len(calls)} calls"


with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
    outcomes = list(pool.map(parallel_case, range(200, 206)))
for seed, outcome in zip(range(200, 206), outcomes):
    print(f"     required parallel seed={seed}: {outcome}")
failed = [s for s, o in zip(range(200, 206), outcomes) if not o.startswith("ok")]
check("required with parallel calls: valid calls, honest finish_reason", not failed, f"seeds {failed}")

# ---------------------------------------------------------------------------------------------
# "auto" at temperature 1: never a server error; text, or calls of offered tools.


def auto_case(seed, stream):
    try:
        if stream:
            content, calls, finishes, _, _ = accumulate(turn1("auto", seed, stream=True, max_tokens=64))
            finish = finishes[-1] if finishes else None
        else:
            c = turn1("auto", seed, max_tokens=64).choices[0]
            content, calls, finish = c.message.content, as_dicts(c.message.tool_calls), c.finish_reason
    except openai.APIStatusError as e:
        return f"FAIL HTTP {e.status_code}: {e}"
    except Exception as e:  # noqa: BLE001
        return f"FAIL {type(e).__name__}: {e}"
    if calls:
        bad = [c for c in calls if c["function"]["name"] not in NAMES]
        if finish != "tool_calls" or bad:
            return f"FAIL calls {calls} with finish {finish!r}"
        return f"ok calls: {short(summary(calls), 100)}"
    if not isinstance(content, str) or finish not in ("stop", "length"):
        return f"FAIL content {content!r}, finish {finish!r}"
    return f"ok content ({finish}): {short(content, 80)}"


cases = [(s, st) for s in range(200, 204) for st in (False, True)]
with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
    outcomes = list(pool.map(lambda a: auto_case(*a), cases))
for (seed, st), outcome in zip(cases, outcomes):
    print(f"     auto seed={seed}{' streamed' if st else ''}: {outcome}")
failed = [c for c, o in zip(cases, outcomes) if o.startswith("FAIL")]
check(f"auto x{len(cases)} at temperature 1: never an error, content or calls", not failed, f"{failed}")

# ---------------------------------------------------------------------------------------------
# Refused with a 400 and an OpenAI error body naming the field, streamed or not.


def expect_400(name, param, fn):
    try:
        fn()
    except openai.BadRequestError as e:
        body = getattr(e, "body", None)
        msg = body.get("message") if isinstance(body, dict) else None
        got = body.get("param") if isinstance(body, dict) else None
        check(
            f"{name} -> 400, param {param}: {short(msg, 110)}",
            isinstance(msg, str) and msg and got == param,
            f"error body {body!r}",
        )
        return
    except Exception as e:  # noqa: BLE001 - report which error came instead
        check(f"{name} -> 400", False, f"expected BadRequestError, got {type(e).__name__}: {e}")
    check(f"{name} -> 400", False, "expected BadRequestError, got success")


BAD_SCHEMA = [
    {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}}},
    }
]
NO_NAME = [{"type": "function", "function": {"parameters": {"type": "object", "properties": {}}}}]
RF = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}}
NEGATIVE = [
    (
        "tool_choice names an unknown function",
        "tool_choice",
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_stock_price"}}),
    ),
    ("a parameter schema with type 'strnig'", "tools", dict(tools=BAD_SCHEMA, tool_choice="auto")),
    ("tools = 5", "tools", dict(extra_body={"tools": 5})),
    ("a tool without a name", "tools", dict(tools=NO_NAME)),
    ("tool_choice required without tools", "tool_choice", dict(tool_choice="required")),
    ("parallel_tool_calls = false with tool_choice auto", "parallel_tool_calls", dict(tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)),
    ("response_format json_schema with tool_choice required", "response_format", dict(tools=TOOLS, tool_choice="required", response_format=RF)),
]
for label, param, extra in NEGATIVE:
    base = dict(model=MODEL, messages=QUESTION, max_tokens=8)
    expect_400(label, param, lambda: client.chat.completions.create(**base, **extra))
    expect_400(f"{label}, streamed", param, lambda: list(client.chat.completions.create(stream=True, **base, **extra)))

# tools = 5 once more as raw JSON, past any client-side handling (the standard library's HTTP).
raw = urllib.request.Request(
    f"{BASE}/chat/completions",
    data=json.dumps({"model": MODEL, "messages": QUESTION, "tools": 5, "max_tokens": 8}).encode(),
    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
)
try:
    with urllib.request.urlopen(raw, timeout=60) as resp:
        status, text = resp.status, resp.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
try:
    err = json.loads(text).get("error") or {}
except ValueError:
    err = {}
check("tools = 5 over raw HTTP -> 400, param tools", status == 400 and err.get("param") == "tools", f"{status} {text[:300]}")

# …and the server still answers with calls.
c = turn1("required", 7).choices[0]
check("still serving calls after the refusals", c.finish_reason == "tool_calls" and call_problems(as_dicts(c.message.tool_calls), NAMES) is None, repr(c))
print("ALL PASSED")
