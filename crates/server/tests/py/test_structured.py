"""Structured outputs (`response_format`) of a running `kiln serve`, driven with the official openai
Python client and checked with `jsonschema`.

Run by crates/server/tests/structured.rs, which starts the server and passes KILN_BASE_URL,
KILN_API_KEY, KILN_MODEL and KILN_SCHEMA_DIR (a folder of `*.json` files, each
`{"prompt": ..., "schema": ..., "example"?: ...}`); KILN_MAX_TOKENS (default 256) caps each answer.

Every schema file is asked for at temperature 1.0 and 0.0 (4 requests at a time). An answer that
finished ("stop") must be JSON valid under the schema, formats included; one cut by max_tokens
("length") is counted, not failed, but at least half of all answers must finish. Then
json_object, streaming, and the requests that must be refused with a 400 before generating.
Prints one line per check and "ALL PASSED" at the end; exits non-zero on a failure.
"""

import calendar
import concurrent.futures
import glob
import json
import os
import re
import sys
import zlib

import openai
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

BASE = os.environ["KILN_BASE_URL"]
KEY = os.environ["KILN_API_KEY"]
MODEL = os.environ["KILN_MODEL"]
SCHEMA_DIR = os.environ["KILN_SCHEMA_DIR"]
MAX_TOKENS = int(os.environ.get("KILN_MAX_TOKENS", "256"))
TEMPERATURES = (1.0, 0.0)
WORKERS = 4

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=600)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def short(text, n=160):
    text = repr(text)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Format checking: jsonschema's Draft 2020-12 checker, with stand-ins for the formats it leaves
# unchecked when their optional packages are missing (rfc3339-validator, rfc3987, fqdn,
# isoduration), so that a format violation is never waved through.

FORMAT_CHECKER = FormatChecker()
FORMAT_CHECKER.checkers = dict(Draft202012Validator.FORMAT_CHECKER.checkers)
FALLBACKS = []


def fallback(name):
    def register(fn):
        if name not in FORMAT_CHECKER.checkers:
            FORMAT_CHECKER.checks(name)(lambda x: not isinstance(x, str) or fn(x))
            FALLBACKS.append(name)
        return fn

    return register


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt]([01]\d|2[0-3]):([0-5]\d):([0-5]\d)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)", re.ASCII
)


@fallback("date-time")
def _date_time(s):  # as rfc3339-validator: no leap seconds, no year 0
    m = _RFC3339.fullmatch(s)
    if not m:
        return False
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    return year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]


@fallback("time")
def _time(s):
    return _date_time("1970-01-01T" + s)


@fallback("uri")
def _uri(s):
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"{}|\\^`]*", s) is not None


@fallback("hostname")
def _hostname(s):
    label = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    return len(s) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*", s, re.ASCII) is not None


@fallback("duration")
def _duration(s):
    return re.fullmatch(r"P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?", s, re.ASCII) is not None


def validator(schema):
    return Draft202012Validator(schema, format_checker=FORMAT_CHECKER)


def errors_of(schema, instance):
    return sorted(validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))


def describe(errors, n=3):
    return "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:160]}" for e in errors[:n])


def response_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


# ---------------------------------------------------------------------------------------------
# The schema files: well-formed, valid JSON Schemas, and their examples (when given) valid.

print(f"format checks: {', '.join(sorted(FORMAT_CHECKER.checkers))} (stand-ins: {', '.join(FALLBACKS) or 'none'})")
files = sorted(glob.glob(os.path.join(SCHEMA_DIR, "*.json")))
check(f"schema files in {SCHEMA_DIR}", files, "none found")
cases = []
for path in files:
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    ok = isinstance(spec, dict) and isinstance(spec.get("prompt"), str) and spec["prompt"] and "schema" in spec
    if not ok:
        check(f"{name}: a prompt and a schema", False, f"keys {list(spec) if isinstance(spec, dict) else type(spec)}")
    try:
        Draft202012Validator.check_schema(spec["schema"])
    except SchemaError as e:
        check(f"{name}: a valid Draft 2020-12 schema", False, e.message)
    if "example" in spec:
        errs = errors_of(spec["schema"], spec["example"])
        check(f"{name}: a valid schema, its example valid", not errs, describe(errs))
    else:
        check(f"{name}: a valid schema (no example)", True)
    for t in TEMPERATURES:
        cases.append((name, t, zlib.crc32(f"{name}@{t}".encode()) & 0x7FFFFFFF, spec))


# ---------------------------------------------------------------------------------------------
# Every schema at every temperature, WORKERS requests at a time.


def run_case(case):
    name, t, seed, spec = case
    try:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": spec["prompt"]}],
            temperature=t,
            seed=seed,
            max_tokens=MAX_TOKENS,
            response_format=response_format(spec["schema"]),
        )
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        return "FAIL", f"{type(e).__name__}: {e}", None
    choice = r.choices[0]
    text, finish = choice.message.content, choice.finish_reason
    toks = r.usage.completion_tokens if r.usage else "?"
    if not isinstance(text, str):
        return "FAIL", f"content {text!r}, finish_reason {finish!r}", None
    if finish == "length":
        return "cut", f"{toks} tokens: {short(text)}", text
    if finish != "stop":
        return "FAIL", f"finish_reason {finish!r}: {short(text)}", text
    try:
        instance = json.loads(text)
    except ValueError as e:
        return "FAIL", f"not JSON ({e}): {short(text)}", text
    errs = errors_of(spec["schema"], instance)
    if errs:
        return "FAIL", f"{describe(errs)} in {short(text, 400)}", text
    return "ok", f"{toks} tokens: {short(text, 100)}", text


with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
    results = list(pool.map(run_case, cases))

tally = {"ok": 0, "cut": 0, "FAIL": 0}
for (name, t, seed, _), (verdict, detail, _) in zip(cases, results):
    tally[verdict] += 1
    print(f"{verdict:<4} {name} temp={t} seed={seed}: {detail}", flush=True)
finished = tally["ok"] + tally["FAIL"]
valid = tally["ok"]
print(
    f"json_schema: {len(cases)} cases, finished {finished}, valid {valid}, cut {tally['cut']}, failed {tally['FAIL']}",
    flush=True,
)
check("every finished json_schema answer is valid", tally["FAIL"] == 0, f"{tally['FAIL']} failed (lines above)")
check(
    "at least half of the json_schema answers finished",
    2 * finished >= len(cases),
    f"only {finished} of {len(cases)} finished: is the constraint applied (and EOS allowed once the JSON is complete)?",
)

# ---------------------------------------------------------------------------------------------
# json_object: any JSON object.

for t in TEMPERATURES:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}],
        temperature=t,
        seed=7,
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    check(f"json_object temp={t}: answer starts an object", isinstance(text, str) and text.lstrip().startswith("{"), short(text))
    if finish == "length":
        print(f"cut  json_object temp={t}: {short(text)}")
        continue
    try:
        value = json.loads(text)
    except ValueError as e:
        check(f"json_object temp={t}: JSON", False, f"{e}: {short(text)}")
    check(f"json_object temp={t}: a JSON object (finish {finish})", finish == "stop" and isinstance(value, dict), short(text))

# ---------------------------------------------------------------------------------------------
# Streaming with a json_schema: the deltas add up to the non-streamed answer, which validates.

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
        "population": {"type": "integer", "minimum": 0, "maximum": 40000000},
        "founded": {"type": "string", "format": "date"},
    },
    "required": ["city", "country", "population", "founded"],
    "additionalProperties": False,
}
for t in TEMPERATURES:
    req = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the city of Paris as JSON."}],
        temperature=t,
        seed=99,
        max_tokens=MAX_TOKENS,
        response_format=response_format(CITY),
    )
    whole = client.chat.completions.create(**req).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **req))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(f"stream temp={t}: deltas == non-streamed content", streamed == whole.message.content, f"{short(streamed)} vs {short(whole.message.content)}")
    check(f"stream temp={t}: one finish_reason, as non-streamed", finishes == [whole.finish_reason], f"{finishes} vs {whole.finish_reason}")
    if finishes == ["length"]:
        print(f"cut  stream temp={t}: {short(streamed)}")
        continue
    try:
        value = json.loads(streamed)
    except ValueError as e:
        check(f"stream temp={t}: JSON", False, f"{e}: {short(streamed)}")
    errs = errors_of(CITY, value)
    check(f"stream temp={t}: valid under the schema", not errs, describe(errs))

# ---------------------------------------------------------------------------------------------
# Refused with 400 and an OpenAI error body, before generating: also when streamed (a stream
# that had started would answer 200 and carry the error as an event).

NEGATIVE = {
    "not a JSON Schema (type 'objekt')": response_format({"type": "objekt"}),
    "json_schema without schema": {"type": "json_schema", "json_schema": {"name": "out", "strict": True}},
    "unknown response_format type 'xml'": {"type": "xml"},
    "json_schema type without json_schema": {"type": "json_schema"},
    # JSON Schema keywords and formats that llguidance 1.9 cannot enforce.
    "unsupported keyword uniqueItems": response_format(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    ),
    "unsupported keyword if/then/else": response_format(
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "if": {"required": ["a"]},
            "then": {"properties": {"a": {"minimum": 1}}},
            "else": {"maxProperties": 0},
        }
    ),
    "unsupported format uri-reference": response_format({"type": "string", "format": "uri-reference"}),
    "unsupported format idn-email (nested)": response_format(
        {"type": "object", "properties": {"mail": {"type": "string", "format": "idn-email"}}, "required": ["mail"]}
    ),
}


def expect_400(name, fn):
    try:
        fn()
    except openai.BadRequestError as e:
        body = getattr(e, "body", None)
        msg = body.get("message") if isinstance(body, dict) else None
        check(f"{name} -> 400", isinstance(msg, str) and msg, f"error body {body!r}")
        return
    except Exception as e:  # noqa: BLE001 - report which error came instead
        check(f"{name} -> 400", False, f"expected BadRequestError, got {type(e).__name__}: {e}")
    check(f"{name} -> 400", False, "expected BadRequestError, got success")


HI = [{"role": "user", "content": "Hi"}]
for label, rf in NEGATIVE.items():
    expect_400(label, lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, response_format=rf))
    expect_400(
        f"{label}, streamed",
        lambda: list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, stream=True, response_format=rf)),
    )

# …and the server still serves constrained answers.
r = client.chat.completions.create(
    model=MODEL, messages=HI, temperature=0, max_tokens=16, response_format=response_format({"enum": ["yes", "no"]})
)
check("still serving after the refusals", r.choices[0].finish_reason == "length" or json.loads(r.choices[0].message.content) in ("yes", "no"), r)
print("ALL PASSED")
