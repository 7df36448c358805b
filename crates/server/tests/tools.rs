//! Function calling (`tools`, `tool_choice`) end to end over real sockets, in both native formats:
//! Hermes/Qwen2.5 (`synth-qwen2-tiny-Q8_0.gguf`, whose template is Qwen2.5's) and Llama 3.1 JSON
//! (a copy of `synth-tiny-Q8_0.gguf` given the real Llama 3.1 8B Instruct template,
//! tests/templates/llama3.1.jinja). Raw HTTP (a minimal HTTP/1.1 client below) checks the JSON
//! and the SSE deltas; tests/py/test_tools.py drives both servers with the official `openai`
//! client (skipped visibly without python3, openai or jsonschema).
//!
//! The models have random weights and never call a tool by themselves: calls are forced with
//! `tool_choice` "required" or a named function, whose grammar makes every call valid.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_engine::Model;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::{dechunk, load};

const KEY: &str = "test-key-tools";
const CHAT: &str = "/v1/chat/completions";
const TIMEZONES: [&str; 4] = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"];
const CITY_MAX: usize = 24;
const RESULT: &str = "{\"temp_c\": 21}";

// ---- Models ----

fn synth(file: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(file)
}

fn llama31_template() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates/llama3.1.jinja");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A model file written for one test in its own temp folder, removed on drop.
struct TempModel {
    dir: PathBuf,
    model: Arc<Model>,
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `synth-tiny-Q8_0.gguf` with `tokenizer.chat_template` replaced by Llama 3.1 8B Instruct's: the
/// server then detects the Llama 3.1 JSON tool-call format.
fn llama31_model(tag: &str) -> TempModel {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-tools-{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let g = kiln_gguf::GgufFile::open(synth("synth-tiny-Q8_0.gguf")).expect("synth-tiny-Q8_0.gguf opens");
    let mut b = kiln_gguf::GgufBuilder::from_file(&g);
    b.set_kv("tokenizer.chat_template", kiln_gguf::Value::String(llama31_template()));
    b.set_kv("general.name", kiln_gguf::Value::String("synth-tiny-llama31".into()));
    let path = dir.join("synth-tiny-llama31-Q8_0.gguf");
    b.write(&path).expect("writing the Llama 3.1 copy");
    let model = load(&path);
    assert!(model.template.is_some(), "the written copy has a chat template");
    TempModel { dir, model }
}

fn start(model: &Arc<Model>) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    cfg.api_key = Some(KEY.into());
    cfg.parallel = 4;
    cfg.ctx = 4096;
    kiln_server::spawn(model.clone(), cfg).expect("server starts")
}

// ---- A minimal HTTP/1.1 client (as in tests/server.rs) ----

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a 400 with an OpenAI-style error body naming `param`; returns its message.
    fn bad_param(&self, param: &str, what: &str) -> String {
        assert_eq!(self.status, 400, "{what}: expected 400, body: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert_eq!(e["type"], json!("invalid_request_error"), "{what}: {}", self.body);
        assert_eq!(e["param"], json!(param), "{what}: the error must name `{param}`: {}", self.body);
        let m = e["message"].as_str().unwrap_or_else(|| panic!("{what}: no message: {}", self.body));
        assert!(!m.is_empty(), "{what}: empty message");
        m.to_string()
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

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    head.push_str(&format!("Authorization: Bearer {KEY}\r\n"));
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b).unwrap();
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

fn post(addr: SocketAddr, body: &Value) -> Resp {
    request(addr, "POST", CHAT, Some(body.to_string().as_bytes()))
}

// ---- Requests and checks ----

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                // A random-weight model would otherwise write a city name until max_tokens.
                "properties": {"city": {"type": "string", "description": "The city name.", "maxLength": CITY_MAX}},
                "required": ["city"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "enum": TIMEZONES}},
                "required": ["timezone"],
                "additionalProperties": false
            }
        }}
    ])
}

fn question() -> Value {
    json!([{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}])
}

fn named(name: &str) -> Value {
    json!({"type": "function", "function": {"name": name}})
}

/// A chat body with the two tools: `extra`'s fields added (over) the defaults.
fn body(model: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": model, "messages": question(), "tools": tools(),
        "temperature": 1.0, "max_tokens": 256,
    });
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// Checks one call's name and arguments (as `get_weather`'s or `get_time`'s schema demands);
/// returns (name, arguments text).
fn check_call(what: &str, name: &str, arguments: &str, allowed: &[&str]) -> (String, String) {
    assert!(allowed.contains(&name), "{what}: function {name:?} is not among {allowed:?}");
    let args: Value = serde_json::from_str(arguments)
        .unwrap_or_else(|e| panic!("{what}: arguments are not JSON ({e}): {arguments:?}"));
    let obj = args.as_object().unwrap_or_else(|| panic!("{what}: arguments are not an object: {arguments}"));
    match name {
        "get_weather" => {
            assert_eq!(obj.len(), 1, "{what}: only `city` is allowed: {arguments}");
            let city = obj["city"].as_str().unwrap_or_else(|| panic!("{what}: city must be a string: {arguments}"));
            assert!(city.chars().count() <= CITY_MAX, "{what}: city longer than maxLength: {arguments}");
        }
        "get_time" => {
            assert_eq!(obj.len(), 1, "{what}: only `timezone` is allowed: {arguments}");
            let tz = obj["timezone"].as_str().unwrap_or_default();
            assert!(TIMEZONES.contains(&tz), "{what}: timezone not in the enum: {arguments}");
        }
        _ => unreachable!(),
    }
    (name.to_string(), arguments.to_string())
}

/// A non-streamed answer that must be calls: finish_reason tool_calls, ids unique, each call
/// valid. Returns the message and (name, arguments) of each call.
fn expect_calls(what: &str, r: &Resp, allowed: &[&str]) -> (Value, Vec<(String, String)>) {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], json!("tool_calls"), "{what}: {}", r.body);
    let msg = c["message"].clone();
    assert_eq!(msg["role"], json!("assistant"), "{what}");
    assert!(msg["content"].is_null() || msg["content"].is_string(), "{what}: content {}", msg["content"]);
    let calls = msg["tool_calls"].as_array().unwrap_or_else(|| panic!("{what}: no tool_calls: {}", r.body));
    assert!(!calls.is_empty(), "{what}: empty tool_calls");
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let id = call["id"].as_str().unwrap_or_default();
        assert!(!id.is_empty() && ids.insert(id.to_string()), "{what}: call {i} id {:?} empty or repeated", call["id"]);
        assert_eq!(call["type"], json!("function"), "{what}: call {i}");
        let f = &call["function"];
        let name = f["name"].as_str().unwrap_or_else(|| panic!("{what}: call {i} has no name"));
        let args = f["arguments"].as_str().unwrap_or_else(|| panic!("{what}: arguments must be a string"));
        out.push(check_call(&format!("{what}, call {i}"), name, args, allowed));
    }
    (msg, out)
}

/// A streamed answer that must be calls, checked delta by delta: the role first; each call's
/// first delta carries its index, id, type "function", the name and empty arguments; the
/// arguments come in later deltas of that index (no id or name again); then one chunk with
/// finish_reason "tool_calls" and [DONE]. Returns (name, arguments) of each call.
fn expect_streamed_calls(what: &str, r: &Resp, allowed: &[&str]) -> Vec<(String, String)> {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{what}: the stream must end with [DONE]: {ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|x| panic!("{what}: event not JSON ({x}): {e}")))
        .collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "{what}: error in stream: {ev:?}");
    let with_choice: Vec<&Value> = chunks.iter().filter(|c| c["choices"].get(0).is_some()).collect();
    assert_eq!(with_choice[0]["choices"][0]["delta"]["role"], json!("assistant"), "{what}: {ev:?}");
    let last = with_choice.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], json!("tool_calls"), "{what}: last chunk {last}");
    let finishes = with_choice.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
    assert_eq!(finishes, 1, "{what}: one finish_reason: {ev:?}");

    // index -> (id, name, arguments, deltas with arguments)
    let mut calls: Vec<(String, String, String, usize)> = Vec::new();
    for c in &with_choice {
        let Some(deltas) = c["choices"][0]["delta"].get("tool_calls") else { continue };
        for d in deltas.as_array().unwrap_or_else(|| panic!("{what}: tool_calls delta not an array: {c}")) {
            let index = d["index"].as_u64().unwrap_or_else(|| panic!("{what}: delta without index: {d}")) as usize;
            if index == calls.len() {
                let id = d["id"].as_str().unwrap_or_default();
                assert!(!id.is_empty(), "{what}: the first delta of call {index} must have an id: {d}");
                assert_eq!(d["type"], json!("function"), "{what}: first delta of call {index}: {d}");
                let name = d["function"]["name"].as_str().unwrap_or_default();
                assert!(!name.is_empty(), "{what}: the first delta of call {index} must name the function: {d}");
                let a = d["function"]["arguments"].as_str().unwrap_or("");
                assert!(a.is_empty(), "{what}: arguments must arrive in a later delta than the name: {d}");
                calls.push((id.to_string(), name.to_string(), String::new(), 0));
            } else {
                assert!(index < calls.len(), "{what}: call index {index} skips ahead of {}: {d}", calls.len());
                assert!(d["id"].is_null() && d["function"]["name"].is_null(), "{what}: id/name again: {d}");
                let a = d["function"]["arguments"].as_str().unwrap_or("");
                calls[index].2.push_str(a);
                calls[index].3 += usize::from(!a.is_empty());
            }
        }
    }
    assert!(!calls.is_empty(), "{what}: no tool_calls deltas: {ev:?}");
    let ids: HashSet<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(ids.len(), calls.len(), "{what}: ids repeat");
    calls
        .iter()
        .enumerate()
        .map(|(i, (_, name, args, n))| {
            assert!(*n >= 1, "{what}: call {i} got no arguments delta");
            check_call(&format!("{what}, streamed call {i}"), name, args, allowed)
        })
        .collect()
}

/// A non-streamed text answer: 200, finish stop/length, no tool_calls. Returns it and the
/// prompt's token count.
fn expect_text(what: &str, r: &Resp) -> (String, u64) {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    let finish = c["finish_reason"].as_str().unwrap_or_default();
    assert!(finish == "stop" || finish == "length", "{what}: finish_reason {finish:?}: {}", r.body);
    assert!(c["message"].get("tool_calls").is_none_or(Value::is_null), "{what}: tool_calls: {}", r.body);
    let text = c["message"]["content"].as_str().unwrap_or_else(|| panic!("{what}: no content: {}", r.body));
    (text.to_string(), v["usage"]["prompt_tokens"].as_u64().unwrap())
}

/// An assistant message calling `get_weather(city)` and the tool's reply, in OpenAI's form.
fn weather_turn(id: &str, city: &str, result: &str) -> Vec<Value> {
    vec![
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": id, "type": "function",
            "function": {"name": "get_weather", "arguments": json!({"city": city}).to_string()}
        }]}),
        json!({"role": "tool", "tool_call_id": id, "content": result}),
    ]
}

fn with_history(model: &str, history: Vec<Value>, extra: Value) -> Value {
    let mut msgs = question().as_array().unwrap().clone();
    msgs.extend(history);
    let mut b = body(model, extra);
    b["messages"] = Value::Array(msgs);
    b
}

/// Everything checked over raw HTTP for one format.
fn raw_http_checks(model: &Arc<Model>, format: &str) {
    let srv = start(model);
    let (a, id) = (srv.addr, srv.model_id.clone());
    let all = ["get_weather", "get_time"];
    let weather = ["get_weather"];
    let what = |s: &str| format!("{format}: {s}");

    // `required` with parallel calls (the default): the grammar lets a call follow a call, so a
    // random-weight model may chain them until max_tokens; every complete call is valid, and a
    // cut answer says `length`, not `tool_calls`.
    for seed in [1, 2, 3] {
        let r = post(a, &body(&id, json!({"tool_choice": "required", "seed": seed})));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let c = &v["choices"][0];
        let calls = c["message"]["tool_calls"].as_array().cloned().unwrap_or_default();
        let used = v["usage"]["completion_tokens"].as_u64().unwrap();
        match c["finish_reason"].as_str() {
            Some("tool_calls") => assert!(!calls.is_empty() && used < 256, "{}", r.body),
            Some("length") => assert_eq!(used, 256, "{}", r.body),
            other => panic!("{format}: required seed {seed}: finish_reason {other:?}: {}", r.body),
        }
        for (i, call) in calls.iter().enumerate() {
            let f = &call["function"];
            check_call(
                &what(&format!("parallel seed {seed}, call {i}")),
                f["name"].as_str().unwrap(),
                f["arguments"].as_str().unwrap(),
                &all,
            );
        }
    }

    // `required` with parallel_tool_calls false: exactly one call; not streamed and streamed
    // give the same call for the same seed.
    for seed in [1, 2, 3] {
        let b = body(&id, json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": seed}));
        let r = post(a, &b);
        let (msg, calls) = expect_calls(&what(&format!("required seed {seed}")), &r, &all);
        let used = r.json()["usage"]["completion_tokens"].clone();
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        let streamed = expect_streamed_calls(&what(&format!("required seed {seed}, streamed")), &post(a, &sb), &all);
        assert_eq!(streamed, calls, "{format}: seed {seed}: streamed and non-streamed calls differ");
        assert_eq!(calls.len(), 1, "{format}: seed {seed}: parallel_tool_calls false gave {calls:?}");
        eprintln!("{format}: required seed {seed}: {calls:?} (content {}, {used} tokens)", msg["content"]);
    }

    // A named function: exactly one call, of it; also with the stream's usage chunk.
    for seed in [4, 5] {
        let b = body(&id, json!({"tool_choice": named("get_weather"), "seed": seed}));
        let (_, calls) = expect_calls(&what(&format!("named seed {seed}")), &post(a, &b), &weather);
        assert_eq!(calls.len(), 1, "{format}: a named tool_choice gives one call: {calls:?}");
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let r = post(a, &sb);
        let streamed = expect_streamed_calls(&what(&format!("named seed {seed}, streamed")), &r, &weather);
        assert_eq!(streamed, calls, "{format}: seed {seed}");
        let ev = r.events();
        let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{format}: usage chunk: {usage}");
    }
    let named_time = body(&id, json!({"tool_choice": named("get_time"), "seed": 6}));
    let (_, calls) = expect_calls(&what("named get_time"), &post(a, &named_time), &["get_time"]);
    assert_eq!(calls.len(), 1);

    // The tool-result turn: the assistant's call (as the server returned it) and the result.
    let r = post(a, &body(&id, json!({"tool_choice": named("get_weather"), "seed": 7})));
    let (msg, calls) = expect_calls(&what("turn 1"), &r, &weather);
    let call_id = msg["tool_calls"][0]["id"].as_str().unwrap().to_string();
    let history = vec![msg.clone(), json!({"role": "tool", "tool_call_id": call_id, "content": RESULT})];
    for (label, extra) in [
        ("turn 2, tool_choice none", json!({"tool_choice": "none", "max_tokens": 16, "seed": 1})),
        ("turn 2, tools left out", json!({"max_tokens": 16, "seed": 1})),
    ] {
        let mut b = with_history(&id, history.clone(), extra);
        if label.ends_with("left out") {
            b.as_object_mut().unwrap().remove("tools");
        }
        let (text, n) = expect_text(&what(label), &post(a, &b));
        eprintln!("{format}: {label}: {text:?} ({n} prompt tokens; turn 1 was {calls:?})");
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        let r = post(a, &sb);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!r.body.contains("tool_calls") && !r.body.contains("\"error\""), "{format}: {label}: {}", r.body);
    }
    // …then `required` again after the result (the next step of an agent loop).
    let b =
        with_history(&id, history.clone(), json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": 8}));
    expect_calls(&what("turn 2, required again"), &post(a, &b), &all);
    // The assistant's call and the tool's result are in the prompt: longer ones, more tokens.
    let prompt_len = |city: &str, result: &str| {
        let b =
            with_history(&id, weather_turn("call_x", city, result), json!({"tool_choice": "none", "max_tokens": 1}));
        expect_text(&what("prompt length"), &post(a, &b)).1
    };
    let base = prompt_len("Paris", RESULT);
    let padding = " and more".repeat(8);
    assert!(prompt_len(&format!("Paris{padding}"), RESULT) > base, "{format}: the call's arguments are not rendered");
    assert!(prompt_len("Paris", &format!("{RESULT}{padding}")) > base, "{format}: the tool result is not rendered");
    // Malformed history: arguments that are not a JSON object.
    let mut bad = weather_turn("call_y", "Paris", RESULT);
    bad[0]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
    post(a, &with_history(&id, bad, json!({"tool_choice": "none"}))).bad_param("messages", "arguments not JSON");
    // Two calls in one assistant turn: Qwen2.5's template writes both; Llama 3.1's refuses
    // ("This model only supports single tool-calls at once!"), a 400 and not a 500.
    let mut two = weather_turn("call_a", "Paris", RESULT);
    let mut second = two[0]["tool_calls"][0].clone();
    second["id"] = json!("call_b");
    second["function"] = json!({"name": "get_time", "arguments": "{\"timezone\": \"Asia/Tokyo\"}"});
    two[0]["tool_calls"].as_array_mut().unwrap().push(second);
    two.push(json!({"role": "tool", "tool_call_id": "call_b", "content": "{\"time\": \"09:00\"}"}));
    let r = post(a, &with_history(&id, two, json!({"tool_choice": "none", "max_tokens": 8})));
    if format == "llama3" {
        let m = r.bad_param("messages", "two calls in one Llama 3.1 assistant turn");
        assert!(m.contains("single tool-calls"), "{m}");
    } else {
        expect_text(&what("two calls in one assistant turn"), &r);
    }

    // The 400s, streamed or not, each naming the field.
    let bad_schema = json!([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}}}}]);
    let no_name = json!([{"type": "function", "function": {"parameters": {"type": "object", "properties": {}}}}]);
    let rf =
        json!({"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}});
    let cases: Vec<(&str, &str, Value)> = vec![
        ("tool_choice names an unknown function", "tool_choice", json!({"tool_choice": named("get_stock_price")})),
        ("a parameter schema with type 'strnig'", "tools", json!({"tools": bad_schema, "tool_choice": "auto"})),
        ("tools = 5", "tools", json!({"tools": 5})),
        ("tools an object", "tools", json!({"tools": {"type": "function"}})),
        ("a tool without a name", "tools", json!({"tools": no_name})),
        (
            "a tool name with a space",
            "tools",
            json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]}),
        ),
        ("a tool of type retrieval", "tools", json!({"tools": [{"type": "retrieval"}]})),
        ("duplicate tool names", "tools", json!({"tools": [tools()[0].clone(), tools()[0].clone()]})),
        ("tool_choice required without tools", "tool_choice", json!({"tools": null, "tool_choice": "required"})),
        ("tool_choice required, tools empty", "tool_choice", json!({"tools": [], "tool_choice": "required"})),
        ("tool_choice 'sometimes'", "tool_choice", json!({"tool_choice": "sometimes"})),
        (
            "parallel_tool_calls = false with tool_choice auto",
            "parallel_tool_calls",
            json!({"parallel_tool_calls": false, "tool_choice": "auto"}),
        ),
        (
            "response_format json_schema with tool_choice required",
            "response_format",
            json!({"tool_choice": "required", "response_format": rf}),
        ),
    ];
    for (label, param, extra) in &cases {
        let b = body(&id, extra.clone());
        let m = post(a, &b).bad_param(param, &what(label));
        eprintln!("{format}: 400 {label}: {m}");
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        post(a, &sb).bad_param(param, &what(&format!("{label}, streamed")));
    }

    // `auto` at temperature 1: never a 500; a non-call answer comes back as content.
    for seed in 0..6 {
        let b = body(&id, json!({"tool_choice": "auto", "seed": seed, "max_tokens": 48}));
        let r = post(a, &b);
        assert_eq!(r.status, 200, "{format}: auto seed {seed}: {}", r.body);
        let v = r.json();
        let c = &v["choices"][0];
        if c["finish_reason"] == json!("tool_calls") {
            assert!(c["message"]["tool_calls"].as_array().is_some_and(|t| !t.is_empty()), "{}", r.body);
        } else {
            assert!(c["message"]["content"].is_string(), "{format}: auto seed {seed}: {}", r.body);
            assert!(c["message"].get("tool_calls").is_none_or(Value::is_null), "{}", r.body);
        }
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        let r = post(a, &sb);
        assert_eq!(r.status, 200, "{format}: auto seed {seed}, streamed: {}", r.body);
        assert!(!r.body.contains("\"error\""), "{format}: auto seed {seed}, streamed: {}", r.body);
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        eprintln!("{format}: auto seed {seed}: {}", c["message"]);
    }

    // …and still serving calls.
    expect_calls(
        &what("after all that"),
        &post(a, &body(&id, json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": 9}))),
        &all,
    );
    srv.stop().unwrap();
}

#[test]
fn tools_hermes_raw_http() {
    let model = load(&synth("synth-qwen2-tiny-Q8_0.gguf"));
    let src = model.template.as_ref().expect("synth-qwen2 has a chat template").source();
    assert!(src.contains("<tool_call>"), "synth-qwen2's template is Qwen2.5's, with tools");
    raw_http_checks(&model, "hermes");
}

#[test]
fn tools_llama3_raw_http() {
    let m = llama31_model("raw");
    raw_http_checks(&m.model, "llama3");
}

/// A model whose template knows no tool-call format: tools that need one are a 400 naming `tools`;
/// tool_choice "none" is plain chat.
#[test]
fn tools_without_a_tool_format() {
    let model = load(&synth("synth-tiny-Q8_0.gguf"));
    let srv = start(&model);
    let (a, id) = (srv.addr, srv.model_id.clone());
    for choice in [json!("auto"), json!("required"), named("get_time")] {
        let m = post(a, &body(&id, json!({"tool_choice": choice}))).bad_param("tools", "no tool-call format");
        assert!(m.contains("tool-call format"), "{m}");
    }
    expect_text("tool_choice none", &post(a, &body(&id, json!({"tool_choice": "none", "max_tokens": 4}))));
    srv.stop().unwrap();
}

/// The saved Llama 3.1 template renders as transformers does: the expected text is the
/// huggingface.js chat-template test case for meta-llama/Llama-3.1-8B-Instruct (a system
/// message, a user turn, one tool: the tools go into the first user message).
#[test]
fn llama31_template_renders_like_transformers() {
    use kiln_tokenizer::template::{ChatMessage, ChatTemplate, Json};
    let t = ChatTemplate::new(&llama31_template(), "<|begin_of_text|>", "<|im_end|>").unwrap();
    let tools = Json::parse(
        r#"[{"type": "function", "function": {"name": "get_current_temperature",
        "description": "Get the current temperature at a location.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string",
        "description": "The location to get the temperature for, in the format \"City, Country\""}},
        "required": ["location"]},
        "return": {"type": "number",
        "description": "The current temperature at the specified location in the specified units, as a float."}}}]"#,
    )
    .unwrap();
    let msgs = [
        ChatMessage::new("system", "You are a bot that responds to weather queries."),
        ChatMessage::new("user", "Hey, what's the temperature in Paris right now?"),
    ];
    let got = t.render_with_tools(&msgs, Some(&tools), true).unwrap();
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\
Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
You are a bot that responds to weather queries.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
Given the following functions, please respond with a JSON for a function call with its proper arguments \
that best answers the given prompt.\n\n\
Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.\
Do not use variables.\n\n{\n    \"type\": \"function\",\n    \"function\": {\n        \
\"name\": \"get_current_temperature\",\n        \
\"description\": \"Get the current temperature at a location.\",\n        \"parameters\": {\n            \
\"type\": \"object\",\n            \"properties\": {\n                \"location\": {\n                    \
\"type\": \"string\",\n                    \
\"description\": \"The location to get the temperature for, in the format \\\"City, Country\\\"\"\n                \
}\n            },\n            \"required\": [\n                \"location\"\n            ]\n        },\n        \
\"return\": {\n            \"type\": \"number\",\n            \
\"description\": \"The current temperature at the specified location in the specified units, as a float.\"\n        \
}\n    }\n}\n\nHey, what's the temperature in Paris right now?<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(got, want);
    // And the server's detection: the template has the ipython role and no <tool_call>.
    let src = llama31_template();
    assert!(src.contains("<|start_header_id|>ipython<|end_header_id|>") && !src.contains("<tool_call>"));
}

// ---- The openai Python client ----

/// Whether python3 with the `openai` and `jsonschema` packages is there; prints SKIPPED if not.
fn python_ready(test: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai, jsonschema; print(openai.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: the openai or jsonschema Python package is missing \
                 (python3 -m pip install openai jsonschema): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: python3 is not available ({e})");
            false
        }
    }
}

fn run_python(test: &str, model: &Arc<Model>, format: &str) {
    let srv = start(model);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let out = std::process::Command::new("python3")
        .arg(dir.join("py/test_tools.py"))
        .env("KILN_BASE_URL", format!("http://{}/v1", srv.addr))
        .env("KILN_API_KEY", KEY)
        .env("KILN_MODEL", &srv.model_id)
        .env("KILN_FORMAT", format)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- test_tools.py, {format} ---\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test}: test_tools.py failed for {format}");
    assert!(stdout.contains("ALL PASSED"), "{test}: {stdout}");
    srv.stop().unwrap();
}

#[test]
fn tools_openai_client() {
    let test = "tools_openai_client";
    if !python_ready(test) {
        return;
    }
    run_python(test, &load(&synth("synth-qwen2-tiny-Q8_0.gguf")), "hermes");
    let m = llama31_model("py");
    run_python(test, &m.model, "llama3");
}
