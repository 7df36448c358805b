//! Request fields a hostile or careless client sends, against a real server (a synth model on a
//! free port, raw HTTP): no field is accepted and ignored. Unknown fields and OpenAI fields kiln
//! does not implement are 400s naming the field on every endpoint; wrong types too; llama.cpp's
//! `n_predict` works as `max_tokens`; the metadata fields OpenAI clients send routinely are
//! accepted and change nothing; and the server answers normally afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::Model;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::dechunk;

const KEY: &str = "test-key-123";
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn synth(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(format!("synth-tiny-{name}.gguf"))
}

fn start(model: &Arc<Model>) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    cfg.api_key = Some(KEY.into());
    cfg.ctx = 256;
    kiln_server::spawn(model.clone(), cfg).expect("server starts")
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

    /// Asserts a 400 OpenAI error whose `param` is `param`; returns its message.
    fn bad(&self, param: &str) -> String {
        assert_eq!(self.status, 400, "body: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert_eq!(e["type"], json!("invalid_request_error"), "{}", self.body);
        assert_eq!(e["param"], json!(param), "{}", self.body);
        let m = e["message"].as_str().expect("message").to_string();
        assert!(!m.contains('\n'), "a one-line message: {m:?}");
        m
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
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
    request(addr, "POST", path, body.to_string().as_bytes())
}

/// `base` with the fields of `extra` added (or replaced).
fn with(base: &Value, extra: Value) -> Value {
    let mut b = base.clone();
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// Text, finish reason and completion tokens of a non-streamed chat or completion.
fn answer(r: &Resp) -> (String, String, u64) {
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    let text = c["message"]["content"].as_str().or(c["text"].as_str()).expect("text").to_string();
    let n = v["usage"]["completion_tokens"].as_u64().expect("usage");
    (text, c["finish_reason"].as_str().expect("finish_reason").to_string(), n)
}

#[test]
fn unknown_unsupported_and_aliased_fields() {
    let model = Arc::new(Model::load(&synth("Q8_0")).expect("model loads"));
    let srv = start(&model);
    let a = srv.addr;
    let chat = json!({"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                      "max_tokens": 12, "ignore_eos": true});
    let completion = json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "ignore_eos": true});
    let (want_chat, finish, n) = answer(&post(a, CHAT, &chat));
    assert_eq!((finish.as_str(), n), ("length", 12));
    let (want_completion, _, _) = answer(&post(a, COMPLETIONS, &completion));

    // Unknown fields, on every endpoint: 400 naming the field.
    let unknown = [
        (CHAT, with(&chat, json!({"frobnicate": true}))),
        (COMPLETIONS, with(&completion, json!({"frobnicate": true}))),
        ("/tokenize", json!({"content": "hi", "frobnicate": true})),
        ("/detokenize", json!({"tokens": [1, 2], "frobnicate": true})),
    ];
    for (path, body) in &unknown {
        let m = post(a, path, body).bad("frobnicate");
        assert!(m.contains("unknown field") && m.contains(path), "{path}: {m}");
    }
    // …also when streaming was asked for: refused before any stream starts.
    post(a, CHAT, &with(&chat, json!({"stream": true, "frobnicate": 1}))).bad("frobnicate");
    // llama.cpp's sampling fields that kiln does not implement are unknown too.
    for name in ["cache_prompt", "n_probs", "mirostat", "typical_p", "dry_multiplier", "samplers"] {
        post(a, CHAT, &with(&chat, json!({ name: 1 }))).bad(name);
        post(a, COMPLETIONS, &with(&completion, json!({ name: 1 }))).bad(name);
    }
    // Fields of one endpoint sent to another.
    post(a, COMPLETIONS, &with(&completion, json!({"messages": []}))).bad("messages");
    post(a, CHAT, &with(&chat, json!({"prompt": "x"}))).bad("prompt");
    post(a, "/tokenize", &json!({"content": "hi", "model": "synth"})).bad("model");
    post(a, "/detokenize", &json!({"tokens": [1], "with_pieces": true})).bad("with_pieces");

    // OpenAI fields kiln does not implement: "not supported", unless null.
    for (name, value) in [
        ("logit_bias", json!({"5": 100})),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("web_search_options", json!({})),
        ("functions", json!([{"name": "f", "parameters": {}}])),
        ("function_call", json!("auto")),
        ("reasoning_effort", json!("low")),
        ("verbosity", json!("low")),
    ] {
        let m = post(a, CHAT, &with(&chat, json!({ name: value }))).bad(name);
        assert!(m.contains("not supported"), "{name}: {m}");
    }
    post(a, COMPLETIONS, &with(&completion, json!({"logit_bias": {"5": 100}}))).bad("logit_bias");
    let nulls = json!({"logit_bias": null, "audio": null, "functions": null, "reasoning_effort": null});
    assert_eq!(answer(&post(a, CHAT, &with(&chat, nulls))).0, want_chat);

    // Wrong types and values of implemented fields: 400 naming the field.
    post(a, CHAT, &with(&chat, json!({"tools": 5}))).bad("tools");
    post(a, CHAT, &with(&chat, json!({"tool_choice": 5}))).bad("tool_choice");
    post(a, CHAT, &with(&chat, json!({"response_format": 5}))).bad("response_format");
    post(a, CHAT, &with(&chat, json!({"temperature": "hot"}))).bad("temperature");
    post(a, COMPLETIONS, &with(&completion, json!({"stop": 5}))).bad("stop");
    post(a, "/tokenize", &json!({"content": 5})).bad("content");
    // Messages: unknown fields, in the message or in a text part.
    let m = post(a, CHAT, &with(&chat, json!({"messages": [{"role": "user", "content": "hi", "mood": "x"}]})))
        .bad("messages");
    assert!(m.contains("\"mood\""), "{m}");
    let part = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]});
    post(a, CHAT, &with(&chat, part)).bad("messages");

    // llama.cpp's n_predict is max_tokens, on both endpoints; with another limit it must agree.
    let no_limit = |b: &Value| {
        let mut b = b.clone();
        b.as_object_mut().unwrap().remove("max_tokens");
        b
    };
    let r = post(a, CHAT, &with(&no_limit(&chat), json!({"n_predict": 12})));
    assert_eq!(answer(&r), (want_chat.clone(), "length".into(), 12));
    let r = post(a, COMPLETIONS, &with(&no_limit(&completion), json!({"n_predict": 12})));
    assert_eq!(answer(&r), (want_completion.clone(), "length".into(), 12));
    let r = post(a, COMPLETIONS, &with(&no_limit(&completion), json!({"n_predict": 5})));
    assert_eq!(answer(&r).2, 5);
    assert_eq!(answer(&post(a, CHAT, &with(&chat, json!({"n_predict": 12})))).2, 12);
    post(a, CHAT, &with(&chat, json!({"n_predict": 5}))).bad("n_predict");
    post(a, COMPLETIONS, &with(&completion, json!({"n_predict": 5}))).bad("n_predict");
    post(a, CHAT, &with(&chat, json!({"max_completion_tokens": 5}))).bad("max_tokens");
    let m = post(a, COMPLETIONS, &with(&no_limit(&completion), json!({"n_predict": 100000}))).bad("n_predict");
    assert!(m.contains("context"), "{m}");

    // Metadata clients send routinely: accepted, and the output is unchanged.
    let meta = json!({"user": "u-1", "safety_identifier": "s-1", "metadata": {"run": "7"}, "store": false,
                      "service_tier": "auto", "prompt_cache_key": "k"});
    assert_eq!(answer(&post(a, CHAT, &with(&chat, meta.clone()))).0, want_chat);
    assert_eq!(answer(&post(a, COMPLETIONS, &with(&completion, meta))).0, want_completion);
    let streamed = post(a, CHAT, &with(&chat, json!({"stream": true, "stream_options": {"include_usage": true}})));
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(streamed.headers.to_ascii_lowercase().contains("text/event-stream"));
    // …but not a value that asks for something kiln does not do.
    post(a, CHAT, &with(&chat, json!({"store": true}))).bad("store");
    post(a, CHAT, &with(&chat, json!({"service_tier": "flex"}))).bad("service_tier");
    post(a, CHAT, &with(&chat, json!({"stream": true, "stream_options": {"include_usage": true, "x": 1}})))
        .bad("stream_options");

    // A hostile field name: still one line, named in the message.
    let name = format!("evil\n\"{}", "x".repeat(5000));
    let r = post(a, CHAT, &with(&chat, json!({ name: 1 })));
    assert_eq!(r.status, 400, "{}", r.body);
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("unknown field") && m.contains("evil") && !m.contains('\n') && m.len() < 400, "{m}");

    // And the server still answers, with the same text as before.
    assert_eq!(answer(&post(a, CHAT, &chat)).0, want_chat);
    assert_eq!(answer(&post(a, COMPLETIONS, &completion)).0, want_completion);
    srv.stop().expect("clean stop");
}
