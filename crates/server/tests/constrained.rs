//! Constrained decoding on /v1/completions (llama.cpp's `grammar` — GBNF or `%llguidance` Lark —
//! and `json_schema`, OpenAI's `response_format`), the legacy completions `logprobs`, and chat
//! log-probabilities under a schema: synth models (a Llama with a SentencePiece vocabulary and a
//! Qwen2 with a BPE vocabulary) served in-process on a free port and driven with raw HTTP. Every
//! output is checked by hand against the language it must belong to.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::Model;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::{dechunk, load};

const KEY: &str = "test-key-constrained";

fn synth_file(file: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(file)
}

/// synth-tiny-{name}.gguf: a Llama with a SentencePiece vocabulary.
fn synth(name: &str) -> PathBuf {
    synth_file(&format!("synth-tiny-{name}.gguf"))
}

/// A Qwen2 with a byte-level BPE vocabulary.
fn synth_qwen2() -> PathBuf {
    synth_file("synth-qwen2-tiny-Q8_0.gguf")
}

fn start(model: &Arc<Model>) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    cfg.api_key = Some(KEY.into());
    cfg.ctx = 1024;
    kiln_server::spawn(model.clone(), cfg).expect("server starts")
}

/// Both synth models, each served on its own port.
fn both_servers() -> Vec<Running> {
    vec![start(&load(&synth("Q8_0"))), start(&load(&synth_qwen2()))]
}

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI-style error with this status (never an event stream); returns its message
    /// and its `param`.
    fn error(&self, status: u16) -> (String, Value) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert!(!self.headers.to_ascii_lowercase().contains("text/event-stream"), "an error streamed: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["type"].is_string() && e["message"].is_string(), "not an OpenAI error: {}", self.body);
        (e["message"].as_str().unwrap().to_string(), e["param"].clone())
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        assert!(self.headers.to_ascii_lowercase().contains("text/event-stream"), "headers: {}", self.headers);
        self.body
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
            .collect()
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, rest) = text.split_once("\r\n\r\n").expect("response head");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.into() };
    Resp { status, headers: head.to_string(), body }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, Some(body.to_string().as_bytes()), Some(KEY))
}

/// `base` with the fields of `extra` added (or replaced).
fn with(base: &Value, extra: Value) -> Value {
    let mut b = base.clone();
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// A completion request for `prompt` with `extra` fields.
fn completion(prompt: &str, extra: Value) -> Value {
    with(&json!({"prompt": prompt}), extra)
}

/// Text and finish reason of a non-streamed completion.
fn answer(r: &Resp) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    let text = c["message"]["content"].as_str().or(c["text"].as_str()).expect("text").to_string();
    (text, c["finish_reason"].as_str().expect("finish_reason").to_string())
}

/// The JSON chunks (before `[DONE]`) of a streamed response, none of them an error.
fn chunks(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {ev:?}");
    ev[..ev.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            assert!(v.get("error").is_none(), "error in stream: {e}");
            v
        })
        .collect()
}

/// Concatenated deltas and finish reason of a streamed completion or chat.
fn stream_answer(r: &Resp) -> (String, String) {
    let (mut text, mut finish) = (String::new(), String::new());
    for v in chunks(r) {
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

// ---- The languages, checked by hand ----

/// `root ::= ("yes" | "no") "." [0-9]{3}`
const YES_NO: &str = r#"root ::= ("yes" | "no") "." [0-9]{3}"#;

/// Whether `s` is in YES_NO's language (`whole`) or can still be completed to a sentence of it.
fn yes_no(s: &str, whole: bool) -> bool {
    let rest = if let Some(r) = s.strip_prefix("yes").or_else(|| s.strip_prefix("no")) {
        r
    } else {
        // Not past the word yet: a prefix of one, for a prefix check.
        return !whole && ("yes".starts_with(s) || "no".starts_with(s));
    };
    let Some(digits) = rest.strip_prefix('.') else { return !whole && rest.is_empty() };
    let ascii_digits = digits.bytes().all(|b| b.is_ascii_digit());
    ascii_digits && if whole { digits.len() == 3 } else { digits.len() <= 3 }
}

/// `start: "a"+ "b"` in llguidance's Lark.
const A_PLUS_B: &str = "%llguidance {}\nstart: \"a\"+ \"b\"";

fn a_plus_b(s: &str, whole: bool) -> bool {
    match s.strip_suffix('b') {
        Some(a) => !a.is_empty() && a.bytes().all(|b| b == b'a'),
        None => !whole && s.bytes().all(|b| b == b'a'),
    }
}

/// A schema with required keys of each type, an enum and integer bounds, nothing else allowed.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "color": {"enum": ["red", "green", "blue"]},
            "member": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 3}
        },
        "required": ["name", "age", "color", "member"],
        "additionalProperties": false
    })
}

/// Checks `text` against person_schema() by hand; panics with the reason.
fn check_person(text: &str, ctx: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {text:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{ctx}: not an object: {text}"));
    for k in ["name", "age", "color", "member"] {
        assert!(o.contains_key(k), "{ctx}: required key {k} missing: {text}");
    }
    for k in o.keys() {
        assert!(["name", "age", "color", "member", "tags"].contains(&k.as_str()), "{ctx}: extra key {k}: {text}");
    }
    let name = o["name"].as_str().unwrap_or_else(|| panic!("{ctx}: name not a string: {text}"));
    let n = name.chars().count();
    assert!((1..=8).contains(&n), "{ctx}: name has {n} characters: {text}");
    let age = o["age"].as_i64().unwrap_or_else(|| panic!("{ctx}: age not an integer: {text}"));
    assert!((18..=99).contains(&age), "{ctx}: age {age} out of bounds: {text}");
    let color = o["color"].as_str().unwrap_or_else(|| panic!("{ctx}: color not a string: {text}"));
    assert!(["red", "green", "blue"].contains(&color), "{ctx}: color {color:?} not in the enum: {text}");
    assert!(o["member"].is_boolean(), "{ctx}: member not a boolean: {text}");
    if let Some(t) = o.get("tags") {
        let t = t.as_array().unwrap_or_else(|| panic!("{ctx}: tags not an array: {text}"));
        assert!(t.len() <= 3, "{ctx}: {} tags: {text}", t.len());
        for x in t {
            // `-0` is the integer 0 (JSON Schema's integers are numbers without a fraction; the
            // grammar, like llama.cpp's, allows a minus before 0; serde reads it as -0.0).
            let x = x
                .as_i64()
                .or_else(|| (x.as_f64() == Some(0.0)).then_some(0))
                .unwrap_or_else(|| panic!("{ctx}: tag {x} not an integer: {text}"));
            assert!((-5..=5).contains(&x), "{ctx}: tag {x} out of bounds: {text}");
        }
    }
}

/// Why a text is not one JSON document.
#[derive(Debug, PartialEq)]
enum JsonEnd {
    /// It ends too early: it is the start of one.
    Early,
    /// Not JSON at this byte offset.
    Bad(usize),
}

/// Checks JSON syntax (RFC 8259) by hand: `Ok` for exactly one document, surrounded by optional
/// whitespace.
fn json_syntax(text: &str) -> Result<(), JsonEnd> {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn peek(&self) -> Result<u8, JsonEnd> {
            self.s.get(self.i).copied().ok_or(JsonEnd::Early)
        }
        fn bad<T>(&self) -> Result<T, JsonEnd> {
            Err(JsonEnd::Bad(self.i))
        }
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> Result<(), JsonEnd> {
            if self.peek()? != c {
                return self.bad();
            }
            self.i += 1;
            Ok(())
        }
        fn digits(&mut self) -> Result<(), JsonEnd> {
            if !self.peek()?.is_ascii_digit() {
                return self.bad();
            }
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            Ok(())
        }
        fn value(&mut self) -> Result<(), JsonEnd> {
            self.ws();
            match self.peek()? {
                b'{' => {
                    self.i += 1;
                    self.ws();
                    if self.peek()? == b'}' {
                        self.i += 1;
                        return Ok(());
                    }
                    loop {
                        self.ws();
                        self.string()?;
                        self.ws();
                        self.eat(b':')?;
                        self.value()?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                return Ok(());
                            }
                            _ => return self.bad(),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    self.ws();
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Ok(());
                    }
                    loop {
                        self.value()?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                return Ok(());
                            }
                            _ => return self.bad(),
                        }
                    }
                }
                b'"' => self.string(),
                b't' | b'f' | b'n' => {
                    for word in ["true", "false", "null"] {
                        let rest = &self.s[self.i..];
                        if rest.starts_with(word.as_bytes()) {
                            self.i += word.len();
                            return Ok(());
                        }
                        if word.as_bytes().starts_with(rest) {
                            return Err(JsonEnd::Early);
                        }
                    }
                    self.bad()
                }
                b'-' | b'0'..=b'9' => {
                    if self.peek()? == b'-' {
                        self.i += 1;
                    }
                    if self.peek()? == b'0' {
                        self.i += 1;
                    } else {
                        self.digits()?;
                    }
                    if self.i < self.s.len() && self.s[self.i] == b'.' {
                        self.i += 1;
                        self.digits()?;
                    }
                    if self.i < self.s.len() && matches!(self.s[self.i], b'e' | b'E') {
                        self.i += 1;
                        if matches!(self.peek()?, b'+' | b'-') {
                            self.i += 1;
                        }
                        self.digits()?;
                    }
                    Ok(())
                }
                _ => self.bad(),
            }
        }
        fn string(&mut self) -> Result<(), JsonEnd> {
            self.eat(b'"')?;
            loop {
                match self.peek()? {
                    b'"' => {
                        self.i += 1;
                        return Ok(());
                    }
                    b'\\' => {
                        self.i += 1;
                        match self.peek()? {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                            b'u' => {
                                self.i += 1;
                                for _ in 0..4 {
                                    if !self.peek()?.is_ascii_hexdigit() {
                                        return self.bad();
                                    }
                                    self.i += 1;
                                }
                            }
                            _ => return self.bad(),
                        }
                    }
                    c if c < 0x20 => return self.bad(),
                    _ => self.i += 1,
                }
            }
        }
    }
    let mut p = P { s: text.as_bytes(), i: 0 };
    p.value()?;
    p.ws();
    if p.i == p.s.len() {
        Ok(())
    } else {
        p.bad()
    }
}

#[test]
fn json_syntax_checker() {
    for ok in [r#"{}"#, r#"{"a": [1, -2.5e+3, true, null, "x\"\u00e9"], "b": {}}"#, "[]", "0", " \"\" "] {
        assert_eq!(json_syntax(ok), Ok(()), "{ok}");
    }
    for early in ["", "{", r#"{"a"#, r#"{"a": tr"#, r#"{"a": 1"#, r#"{"a": "\u00"#, "[1,", r#"{"a": -"#, r#"{"a": 1e"#]
    {
        assert_eq!(json_syntax(early), Err(JsonEnd::Early), "{early}");
    }
    for bad in ["{]", r#"{"a" 1}"#, "[01]", r#"{"a": tru}"#, "{} x", r#"["\x"]"#, "[1.]", "{'a': 1}"] {
        assert!(matches!(json_syntax(bad), Err(JsonEnd::Bad(_))), "{bad}");
    }
}

/// The sampling settings every positive case runs under: greedy, and sampled with a few seeds.
fn samplings() -> Vec<Value> {
    let mut v = vec![json!({"temperature": 0})];
    v.extend((1..=4).map(|seed| json!({"temperature": 1.0, "seed": seed})));
    v
}

/// A GBNF grammar and a `%llguidance` Lark grammar: the whole output is a sentence of the
/// language, ending with finish_reason stop, greedy and sampled, on both vocabularies.
#[test]
fn grammars_constrain_completions() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        for s in samplings() {
            let ctx = format!("{id} {s}");
            let r = post(
                a,
                "/v1/completions",
                &completion("Answer:", with(&s, json!({"grammar": YES_NO, "max_tokens": 32}))),
            );
            let (text, finish) = answer(&r);
            assert!(yes_no(&text, true), "{ctx}: {text:?} is not in ({YES_NO})");
            assert_eq!(finish, "stop", "{ctx}: {text:?}");

            let r = post(
                a,
                "/v1/completions",
                &completion("Letters:", with(&s, json!({"grammar": A_PLUS_B, "max_tokens": 64}))),
            );
            let (text, finish) = answer(&r);
            assert_eq!(finish, "stop", "{ctx}: {text:?}");
            assert!(a_plus_b(&text, true), "{ctx}: {text:?} is not in a+b");
        }
        srv.stop().unwrap();
    }
}

/// `json_schema` (llama.cpp's field), `response_format` json_schema and json_object on
/// completions: the output parses and meets the schema.
#[test]
fn json_schemas_constrain_completions() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        let rf = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
        let mut objects = 0;
        for s in samplings() {
            let ctx = format!("{id} {s}");
            let r = post(
                a,
                "/v1/completions",
                &completion("Person:", with(&s, json!({"json_schema": person_schema(), "max_tokens": 200}))),
            );
            let (text, finish) = answer(&r);
            assert_eq!(finish, "stop", "{ctx}: {text:?}");
            check_person(&text, &format!("json_schema {ctx}"));

            let r = post(
                a,
                "/v1/completions",
                &completion("Person:", with(&s, json!({"response_format": rf, "max_tokens": 200}))),
            );
            let (text, finish) = answer(&r);
            assert_eq!(finish, "stop", "{ctx}: {text:?}");
            check_person(&text, &format!("response_format {ctx}"));

            let r = post(
                a,
                "/v1/completions",
                &completion("JSON:", with(&s, json!({"response_format": {"type": "json_object"}, "max_tokens": 400}))),
            );
            let (text, finish) = answer(&r);
            // Checked with json_syntax, not serde_json: a random model may write numbers such as
            // 1E8103628, valid JSON that serde_json refuses as out of range.
            assert!(text.starts_with('{'), "json_object {ctx}: {text:?}");
            if finish == "stop" {
                assert_eq!(json_syntax(&text), Ok(()), "json_object {ctx}: not JSON: {text:?}");
                objects += 1;
            } else {
                // A random model may write one endless string: cut short, the text is still the
                // start of a JSON document.
                assert_eq!(finish, "length", "json_object {ctx}");
                assert_eq!(json_syntax(&text), Err(JsonEnd::Early), "json_object {ctx}: not a JSON prefix: {text:?}");
            }
        }
        assert!(objects > 0, "{id}: json_object never finished an object");
        srv.stop().unwrap();
    }
}

/// Streamed with a grammar, the deltas add up to the non-streamed text for the same seed; cut
/// short by max_tokens, the text is a prefix of a sentence and finish_reason is "length".
#[test]
fn streamed_and_truncated_grammar_output() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        for seed in [3, 11] {
            for (grammar, max) in [(YES_NO, 32), (A_PLUS_B, 64)] {
                let body = completion(
                    "Answer:",
                    json!({"grammar": grammar, "temperature": 1.0, "seed": seed, "max_tokens": max}),
                );
                let whole = answer(&post(a, "/v1/completions", &body));
                let streamed = stream_answer(&post(a, "/v1/completions", &with(&body, json!({"stream": true}))));
                assert_eq!(streamed, whole, "{id} seed {seed} {grammar:?}");
            }
            let json_body = completion(
                "Person:",
                json!({"json_schema": person_schema(), "temperature": 1.0, "seed": seed, "max_tokens": 200}),
            );
            let whole = answer(&post(a, "/v1/completions", &json_body));
            let streamed = stream_answer(&post(a, "/v1/completions", &with(&json_body, json!({"stream": true}))));
            assert_eq!(streamed, whole, "{id} seed {seed} json_schema");
        }
        // Too few tokens for a whole sentence (YES_NO needs at least 5 characters; one token
        // holds at most a few of them here).
        for s in samplings() {
            let body = completion("Answer:", with(&s, json!({"grammar": YES_NO, "max_tokens": 1})));
            let (text, finish) = answer(&post(a, "/v1/completions", &body));
            assert_eq!(finish, "length", "{id} {s}: {text:?}");
            assert!(yes_no(&text, false) && !text.is_empty(), "{id} {s}: {text:?} is no prefix of ({YES_NO})");
            let (stext, sfinish) = stream_answer(&post(a, "/v1/completions", &with(&body, json!({"stream": true}))));
            assert_eq!((stext.as_str(), sfinish.as_str()), (text.as_str(), "length"), "{id} {s} streamed");

            let body = completion("Person:", with(&s, json!({"json_schema": person_schema(), "max_tokens": 4})));
            let (text, finish) = answer(&post(a, "/v1/completions", &body));
            assert_eq!(finish, "length", "{id} {s}: {text:?}");
            assert!(text.starts_with('{'), "{id} {s}: {text:?}");
            assert!(serde_json::from_str::<Value>(&text).is_err(), "{id} {s}: complete JSON in 4 tokens? {text:?}");
        }
        srv.stop().unwrap();
    }
}

/// Every constraint that cannot be enforced, and every malformed constraint field, is a 400
/// naming the field, before anything is generated — also for `stream: true` — and the server
/// answers normally afterwards.
#[test]
fn unenforceable_constraints_are_400() {
    let srv = start(&load(&synth("Q8_0")));
    let a = srv.addr;
    let base = json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0});
    let syntax = "root ::= \"a\" item\nitem ::= [a-z\n";
    // (extra fields, param, words the message must hold)
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"grammar": syntax}), "grammar", vec!["grammar cannot be enforced", "line 2, column"]),
        (
            json!({"grammar": "root ::= \"x\" item"}),
            "grammar",
            vec!["cannot be enforced", "line 1, column 14", "undefined rule `item`"],
        ),
        (json!({"grammar": "item ::= \"x\""}), "grammar", vec!["root"]),
        (json!({"grammar": "%llguidance {}\nstart: \"a\" nothing"}), "grammar", vec!["cannot be enforced"]),
        (json!({"json_schema": {"type": "objekt"}}), "json_schema", vec!["json_schema cannot be enforced"]),
        (
            json!({"json_schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true}}),
            "json_schema",
            vec!["cannot be enforced", "uniqueItems"],
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}),
            "response_format",
            vec!["cannot be enforced"],
        ),
        (json!({"grammar": 5}), "grammar", vec!["grammar must be a string"]),
        (json!({"json_schema": "x"}), "json_schema", vec!["json_schema must be a JSON Schema object"]),
        (json!({"response_format": {"type": "xml"}}), "response_format", vec!["\"xml\""]),
        (json!({"response_format": {"type": "json_schema"}}), "response_format", vec!["json_schema"]),
        (
            json!({"grammar": YES_NO, "json_schema": person_schema()}),
            "grammar",
            vec!["json_schema and grammar", "only one"],
        ),
        (
            json!({"response_format": {"type": "json_object"}, "json_schema": person_schema()}),
            "json_schema",
            vec!["response_format and json_schema"],
        ),
    ];
    for (extra, param, words) in &cases {
        for stream in [false, true] {
            let body = with(&with(&base, extra.clone()), json!({"stream": stream}));
            let r = post(a, "/v1/completions", &body);
            let (msg, got) = r.error(400);
            assert_eq!(got, json!(param), "{extra} stream={stream}: {msg}");
            for w in words {
                assert!(msg.contains(w), "{extra} stream={stream}: {w:?} not in {msg:?}");
            }
        }
    }
    // The GBNF error's position points at the unclosed class: line 2, column 10.
    let (msg, _) = post(a, "/v1/completions", &with(&base, json!({"grammar": syntax}))).error(400);
    assert!(msg.contains("line 2, column 10: unterminated character class"), "{msg}");
    // Chat refuses the same ways.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
    for (extra, param, _) in &cases {
        let (msg, got) = post(a, "/v1/chat/completions", &with(&chat, extra.clone())).error(400);
        assert_eq!(got, json!(param), "chat {extra}: {msg}");
    }
    // …and the server still serves, constrained or not.
    let (text, finish) =
        answer(&post(a, "/v1/completions", &with(&base, json!({"grammar": YES_NO, "max_tokens": 32}))));
    assert!(yes_no(&text, true) && finish == "stop", "{text:?} {finish}");
    let (text, _) = answer(&post(a, "/v1/completions", &base));
    assert!(!text.is_empty());
    let s = stream_answer(&post(a, "/v1/completions", &with(&base, json!({"stream": true}))));
    assert_eq!(s.0, text);
    srv.stop().unwrap();
}

/// The legacy completions logprobs of one response: tokens, their log-probabilities, the
/// alternatives and the offsets, as parallel lists.
struct Legacy {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top: Vec<serde_json::Map<String, Value>>,
    offsets: Vec<u64>,
}

impl Legacy {
    fn new() -> Legacy {
        Legacy { tokens: vec![], token_logprobs: vec![], top: vec![], offsets: vec![] }
    }

    fn extend(&mut self, lp: &Value, ctx: &str) {
        let o = lp.as_object().unwrap_or_else(|| panic!("{ctx}: logprobs not an object: {lp}"));
        let list = |k: &str| o[k].as_array().unwrap_or_else(|| panic!("{ctx}: {k} not a list: {lp}")).clone();
        let (tokens, lps, top, off) =
            (list("tokens"), list("token_logprobs"), list("top_logprobs"), list("text_offset"));
        assert_eq!(lps.len(), tokens.len(), "{ctx}: {lp}");
        assert_eq!(top.len(), tokens.len(), "{ctx}: {lp}");
        assert_eq!(off.len(), tokens.len(), "{ctx}: {lp}");
        self.tokens.extend(tokens.iter().map(|t| t.as_str().expect("token string").to_string()));
        self.token_logprobs.extend(lps.iter().map(|x| x.as_f64().expect("token_logprob number")));
        self.top.extend(top.iter().map(|m| m.as_object().expect("top_logprobs entry is a map").clone()));
        self.offsets.extend(off.iter().map(|x| x.as_u64().expect("text_offset integer")));
    }

    /// The shape every response must have for `logprobs: k`, with the offsets of a body. With
    /// `lenient_bytes`, alternatives printed as U+FFFD (byte tokens, pieces of a UTF-8 character)
    /// are excused (see completion_top_logprobs_of_byte_tokens).
    fn check(&self, k: usize, lenient_bytes: bool, ctx: &str) {
        self.check_values(k, lenient_bytes, ctx);
        let mut at = 0u64;
        for (i, t) in self.tokens.iter().enumerate() {
            assert_eq!(self.offsets[i], at, "{ctx}: text_offset of token {i} {t:?}: {:?}", self.offsets);
            at += t.chars().count() as u64;
        }
    }

    /// The log-probabilities for `logprobs: k`: finite, at most 0, k alternatives each, the chosen
    /// token's equal to its entry among the alternatives.
    fn check_values(&self, k: usize, lenient_bytes: bool, ctx: &str) {
        assert!(!self.tokens.is_empty(), "{ctx}: no tokens");
        for (i, t) in self.tokens.iter().enumerate() {
            let lp = self.token_logprobs[i];
            assert!(lp <= 0.0 && lp.is_finite(), "{ctx}: token {i} {t:?} has logprob {lp}");
            let bytes = lenient_bytes && self.top[i].contains_key("\u{FFFD}");
            if bytes {
                assert!(self.top[i].len() <= k, "{ctx}: token {i}: {:?}", self.top[i]);
            } else {
                assert_eq!(self.top[i].len(), k, "{ctx}: token {i}: {:?}", self.top[i]);
            }
            for (alt, v) in &self.top[i] {
                let v = v.as_f64().unwrap_or_else(|| panic!("{ctx}: {alt:?}: {v}"));
                assert!(v <= 0.0, "{ctx}: token {i}: alternative {alt:?} has logprob {v}");
            }
            if let Some(v) = self.top[i].get(t).filter(|_| !(lenient_bytes && t.contains('\u{FFFD}'))) {
                assert!((v.as_f64().unwrap() - lp).abs() < 1e-6, "{ctx}: token {i} {t:?}: {lp} vs its entry {v}");
            }
        }
    }

    /// The tokens are the pieces of the text: joined, they are the text (where it is plain ASCII,
    /// so that no character is split between tokens), and each offset points at its token.
    fn check_text(&self, text: &str, ctx: &str) {
        if !text.is_ascii() {
            return;
        }
        assert_eq!(self.tokens.concat(), text, "{ctx}: the tokens {:?} do not make up the text", self.tokens);
        for (t, &o) in self.tokens.iter().zip(&self.offsets) {
            assert!(
                text.get(o as usize..).is_some_and(|r| r.starts_with(t.as_str())),
                "{ctx}: {t:?} is not at {o} in {text:?}"
            );
        }
    }
}

/// The logprobs of a non-streamed completion, its text and finish reason.
fn legacy_body(r: &Resp, ctx: &str) -> (Legacy, String, String) {
    let (text, finish) = answer(r);
    let mut l = Legacy::new();
    l.extend(&r.json()["choices"][0]["logprobs"], ctx);
    (l, text, finish)
}

/// The logprobs of a streamed completion (each chunk's own lists joined), its text and finish.
fn legacy_stream(r: &Resp, ctx: &str) -> (Legacy, String, String) {
    let (mut text, mut finish) = (String::new(), String::new());
    let mut l = Legacy::new();
    for v in chunks(r) {
        let Some(c) = v["choices"].get(0) else { continue };
        let delta = c["text"].as_str().unwrap_or("");
        if !c["logprobs"].is_null() {
            l.extend(&c["logprobs"], &format!("{ctx} chunk {v}"));
        } else {
            assert!(delta.is_empty(), "{ctx}: text without logprobs: {v}");
        }
        text.push_str(delta);
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (l, text, finish)
}

/// Completions' `logprobs: k`: the legacy parallel lists, in the body and per streamed chunk, with
/// the same numbers for the same seed; k > 20 is a 400.
#[test]
fn completion_logprobs_legacy_shape() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        for k in [0usize, 3] {
            for s in [
                json!({"temperature": 0}),
                json!({"temperature": 1.0, "seed": 5}),
                json!({"temperature": 0.8, "seed": 9, "top_k": 1}),
            ] {
                let ctx = format!("{id} k={k} {s}");
                let body = completion(
                    "Once upon a time",
                    with(&s, json!({"logprobs": k, "max_tokens": 12, "ignore_eos": true})),
                );
                let (l, text, finish) = legacy_body(&post(a, "/v1/completions", &body), &ctx);
                assert_eq!(finish, "length", "{ctx}");
                assert_eq!(l.tokens.len(), 12, "{ctx}: one entry per generated token");
                l.check(k, true, &ctx);
                if s["temperature"] == json!(0) && k > 0 {
                    // Greedy without penalties or constraints: each token is its most likely one.
                    for i in 0..l.tokens.len() {
                        let best = l.top[i].values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
                        assert!(
                            (l.token_logprobs[i] - best).abs() < 1e-6,
                            "{ctx}: token {i}: {} vs best {best}",
                            l.token_logprobs[i]
                        );
                    }
                }
                let (sl, stext, sfinish) =
                    legacy_stream(&post(a, "/v1/completions", &with(&body, json!({"stream": true}))), &ctx);
                assert_eq!((stext.as_str(), sfinish.as_str()), (text.as_str(), "length"), "{ctx} streamed");
                // (Their text_offset: completion_logprobs_text_offsets_follow_the_text.)
                sl.check_values(k, true, &format!("{ctx} streamed"));
                assert_eq!(sl.tokens, l.tokens, "{ctx} streamed");
                assert_eq!(sl.token_logprobs, l.token_logprobs, "{ctx} streamed");
                assert_eq!(sl.top, l.top, "{ctx} streamed");
            }
        }

        // The log-probabilities are the model's own: the first token's alternatives are the
        // same whatever the sampling filters, penalties or constraint (its distribution depends
        // on the prompt alone), and a filter keeping only one token leaves the others finite.
        let first = |extra: Value| {
            let body = completion("Answer:", with(&json!({"logprobs": 5, "max_tokens": 3}), extra));
            let (l, text, _) = legacy_body(&post(a, "/v1/completions", &body), &format!("{id} raw"));
            l.check(5, true, &format!("{id} raw {body}"));
            (l, text)
        };
        let (free, _) = first(json!({"temperature": 0}));
        let variants = [
            json!({"temperature": 1.0, "seed": 2, "top_k": 1}),
            json!({"temperature": 1.0, "seed": 2, "top_p": 0.01, "min_p": 0.5}),
            json!({"temperature": 0, "presence_penalty": 2.0, "frequency_penalty": 2.0}),
            json!({"temperature": 0, "grammar": YES_NO}),
            json!({"temperature": 1.0, "seed": 4, "grammar": YES_NO}),
        ];
        for v in variants {
            let (l, text) = first(v.clone());
            let keys = |m: &serde_json::Map<String, Value>| {
                let mut k: Vec<String> = m.keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(&l.top[0]), keys(&free.top[0]), "{id} {v}: first-token alternatives changed");
            for (t, x) in &free.top[0] {
                let y = l.top[0][t].as_f64().unwrap();
                assert!((x.as_f64().unwrap() - y).abs() < 1e-3, "{id} {v}: {t:?}: {x} vs {y}");
            }
            if v.get("grammar").is_some() {
                assert!(yes_no(&text, false), "{id} {v}: {text:?}");
            }
        }

        // logprobs out of range.
        for bad in [json!(21), json!(-1), json!(100)] {
            for stream in [false, true] {
                let body = completion("Hi", json!({"logprobs": bad, "max_tokens": 4, "stream": stream}));
                let (msg, param) = post(a, "/v1/completions", &body).error(400);
                assert_eq!(param, json!("logprobs"), "{bad}: {msg}");
                assert!(msg.contains("[0, 20]"), "{msg}");
            }
        }
        assert_eq!(post(a, "/v1/completions", &completion("Hi", json!({"logprobs": 2, "max_tokens": 2}))).status, 200);
        srv.stop().unwrap();
    }
}

/// `logprobs: 20` gives 20 alternatives per token, also where several of them are byte tokens
/// (pieces of a UTF-8 character, which print alike), and the chosen token's log-probability is
/// the one of its own entry.
#[test]
fn completion_top_logprobs_of_byte_tokens() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        for s in samplings() {
            let ctx = format!("{id} k=20 {s}");
            let body =
                completion("Once upon a time", with(&s, json!({"logprobs": 20, "max_tokens": 12, "ignore_eos": true})));
            let (l, _, _) = legacy_body(&post(a, "/v1/completions", &body), &ctx);
            l.check(20, false, &ctx);
        }
        srv.stop().unwrap();
    }
}

/// Completions' `text_offset` indexes the text that is returned, streamed or not: the tokens
/// joined make up the text (plain ASCII), every offset points at its token, and the streamed
/// chunks carry the body's offsets (each chunk's first offset is the length of the text before it).
#[test]
fn completion_logprobs_text_offsets_follow_the_text() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        let mut settings = vec![json!({"temperature": 0, "max_tokens": 12})];
        for seed in 1..=5 {
            settings.push(json!({"temperature": 1.0, "seed": seed, "max_tokens": 1}));
            settings.push(json!({"temperature": 1.0, "seed": seed, "max_tokens": 12}));
        }
        for s in settings {
            let ctx = format!("{id} {s}");
            let body = completion("Once upon a time", with(&s, json!({"logprobs": 1, "ignore_eos": true})));
            let (l, text, _) = legacy_body(&post(a, "/v1/completions", &body), &ctx);
            l.check_text(&text, &ctx);
            let r = post(a, "/v1/completions", &with(&body, json!({"stream": true})));
            let mut sent = 0u64;
            for c in chunks(&r) {
                let Some(ch) = c["choices"].get(0) else { continue };
                if let Some(off) = ch["logprobs"]["text_offset"].as_array().and_then(|o| o.first()) {
                    assert_eq!(off.as_u64(), Some(sent), "{ctx}: chunk {c} after {sent} characters");
                }
                sent += ch["text"].as_str().unwrap_or("").chars().count() as u64;
            }
            let (sl, stext, _) = legacy_stream(&r, &ctx);
            assert_eq!(stext, text, "{ctx}");
            assert_eq!(
                sl.offsets, l.offsets,
                "{ctx}: streamed text_offset {:?} vs {:?} in the body (tokens {:?}, text {text:?})",
                sl.offsets, l.offsets, l.tokens
            );
        }
        srv.stop().unwrap();
    }
}

/// Chat with a JSON schema and `logprobs: true, top_logprobs: 2`: one content entry per generated
/// token, each with two alternatives, and the content meets the schema; streamed, the same.
#[test]
fn chat_json_schema_with_logprobs() {
    for srv in both_servers() {
        let a = srv.addr;
        let id = srv.model_id.clone();
        for s in samplings() {
            let ctx = format!("{id} {s}");
            let body = with(
                &s,
                json!({
                    "messages": [{"role": "user", "content": "Describe a person."}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}},
                    "logprobs": true, "top_logprobs": 2, "max_tokens": 200,
                }),
            );
            let r = post(a, "/v1/chat/completions", &body);
            let (text, finish) = answer(&r);
            assert_eq!(finish, "stop", "{ctx}: {text:?}");
            check_person(&text, &ctx);
            let v = r.json();
            let content = v["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content").clone();
            let generated = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
            assert_eq!(content.len(), generated, "{ctx}: one entry per generated token");
            let mut bytes = Vec::new();
            for (i, e) in content.iter().enumerate() {
                let lp = e["logprob"].as_f64().unwrap_or_else(|| panic!("{ctx}: entry {i}: {e}"));
                assert!(lp <= 0.0, "{ctx}: entry {i}: {e}");
                let top = e["top_logprobs"].as_array().unwrap_or_else(|| panic!("{ctx}: entry {i}: {e}"));
                assert_eq!(top.len(), 2, "{ctx}: entry {i}: {e}");
                assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap(), "{ctx}: {e}");
                assert!(top.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0), "{ctx}: {e}");
                bytes.extend(e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
            }
            // The entries are the tokens of the content (an end-of-generation token writes nothing).
            assert_eq!(String::from_utf8_lossy(&bytes), text, "{ctx}");

            let r = post(a, "/v1/chat/completions", &with(&body, json!({"stream": true})));
            let mut n = 0;
            let mut stext = String::new();
            for c in chunks(&r) {
                let Some(ch) = c["choices"].get(0) else { continue };
                stext.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
                if let Some(l) = ch["logprobs"]["content"].as_array() {
                    n += l.len();
                }
            }
            assert_eq!(stext, text, "{ctx} streamed");
            assert_eq!(n, content.len(), "{ctx} streamed");
        }
        srv.stop().unwrap();
    }
}
