//! The server end to end over real sockets: a synth model and SmolLM2 served in-process on a free
//! port, driven with raw HTTP (a minimal HTTP/1.1 client below) and with the official `openai`
//! Python client (tests/py/test_openai_client.py).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_engine::{GenerateOptions, Model, Sampler, SamplingParams, Session};
use kiln_model::Precision;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::{dechunk, load};

const KEY: &str = "test-key-123";

fn synth(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(format!("synth-tiny-{name}.gguf"))
}

/// SmolLM2, resolved (and fetched) like the CLI's default model; `None` (with a visible SKIPPED
/// line) when it cannot be had.
fn smollm2(test: &str) -> Option<Arc<Model>> {
    match kiln_engine::default_model::ensure() {
        Ok(p) => Some(load(&p)),
        Err(e) => {
            eprintln!("SKIPPED {test}: the default model (SmolLM2) could not be fetched: {e:#}");
            None
        }
    }
}

fn start(model: &Arc<Model>, edit: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    edit(&mut cfg);
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

    /// Asserts an OpenAI-style error with this status; returns its message.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "body: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["type"].is_string() && e["message"].is_string(), "not an OpenAI error: {}", self.body);
        e["message"].as_str().unwrap().to_string()
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

fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> TcpStream {
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
        // The server may answer (413) and close before reading all of a large body.
        let _ = s.write_all(b);
    }
    s
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> Resp {
    let mut s = send(addr, method, path, body, key);
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

fn chat_body(model: &str, user: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": user}]});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// Text and finish reason of a (non-streamed) chat or completion response.
fn answer(r: &Resp) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    let text = c["message"]["content"].as_str().or(c["text"].as_str()).expect("text").to_string();
    (text, c["finish_reason"].as_str().expect("finish_reason").to_string())
}

/// Concatenated deltas, finish reason and usage of a streamed response.
fn stream_answer(r: &Resp) -> (String, String, Option<Value>) {
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {ev:?}");
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), None);
    for e in &ev[..ev.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "error in stream: {e}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    (text, finish, usage)
}

/// The greedy continuation `kiln run` would print for `prompt` (same Session, same sampler).
fn session_text(model: &Model, prompt: &[u32], params: SamplingParams, max_tokens: usize, eog: bool) -> String {
    let mut s = Session::new(model, model.default_ctx(), Precision::Fast);
    let opts = GenerateOptions { max_tokens, stop: vec![], stop_at_eog: eog };
    s.generate(prompt, &opts, &mut Sampler::new(params), |_| true).expect("generate").text
}

fn tokenize(addr: SocketAddr, text: &str, add_special: bool) -> Vec<u32> {
    let r = post(addr, "/tokenize", &json!({"content": text, "add_special": add_special}));
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_value(r.json()["tokens"].clone()).unwrap()
}

/// Endpoints, auth, streaming against non-streaming, stop strings, seeds, logprobs, metrics, and
/// every bad-input case answered with an OpenAI-style 4xx that leaves the server serving.
#[test]
fn synth_endpoints_errors_and_auth() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.api_key = Some(KEY.into());
        c.ctx = 256;
        c.body_limit = 64 << 10;
    });
    let (a, id) = (srv.addr, srv.model_id.clone());
    assert_eq!(id, "synth-tiny-Q8_0");

    // Auth: /health is open, everything else needs the key.
    assert_eq!(request(a, "GET", "/health", None, None).status, 200);
    request(a, "GET", "/v1/models", None, None).error(401);
    request(a, "GET", "/metrics", None, Some("wrong-key")).error(401);
    request(a, "POST", "/v1/chat/completions", Some(b"{}"), Some("test-key-12")).error(401);
    let models = request(a, "GET", "/v1/models", None, Some(KEY)).json();
    assert_eq!(models["data"][0]["id"], json!(id));
    assert_eq!(request(a, "GET", &format!("/v1/models/{id}"), None, Some(KEY)).status, 200);
    request(a, "GET", "/v1/models/gpt-4", None, Some(KEY)).error(404);

    // Greedy chat: streamed and not streamed give the same text; usage counts add up.
    let greedy = json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true});
    let r = post(a, "/v1/chat/completions", &chat_body(&id, "Hello there", greedy.clone()));
    let (text, finish) = answer(&r);
    assert_eq!(finish, "length");
    let usage = &r.json()["usage"];
    assert_eq!(usage["completion_tokens"], json!(24));
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt_tokens + 24);
    let mut sb = chat_body(&id, "Hello there", greedy.clone());
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (stext, sfinish, susage) = stream_answer(&post(a, "/v1/chat/completions", &sb));
    assert_eq!((stext.as_str(), sfinish.as_str()), (text.as_str(), "length"));
    let susage = susage.expect("usage chunk");
    assert_eq!(susage["prompt_tokens"].as_u64(), Some(prompt_tokens));
    // The same prompt again from the slot's cache: all but the last 16 tokens of a prompt read by
    // the prompt kernels (they are read again, as a fresh prompt reads them), all but the last
    // token of a shorter one.
    let min_chunk = kiln_engine::scheduler::MIN_CHUNK as u64;
    let cached = if prompt_tokens >= min_chunk { prompt_tokens - min_chunk } else { prompt_tokens - 1 };
    assert_eq!(susage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(cached));

    // Completions: prompt tokens as /tokenize counts them (BOS added); the greedy text is what
    // `kiln run`'s Session produces for the same tokens.
    let prompt = "Once upon a time";
    let ids = tokenize(a, prompt, true);
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": id, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": true}),
    );
    let (ctext, _) = answer(&r);
    assert_eq!(r.json()["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    assert_eq!(ctext, session_text(&model, &ids, SamplingParams::greedy(), 32, false));
    // Token-id prompts are taken as they are.
    let r = post(a, "/v1/completions", &json!({"prompt": ids, "max_tokens": 32, "temperature": 0, "ignore_eos": true}));
    assert_eq!(answer(&r).0, ctext);

    // Stop strings: the text ends right before the first occurrence, finish_reason "stop", also
    // when streamed (the stop string is held back, never sent).
    let chars: Vec<char> = ctext.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let want = &ctext[..ctext.find(&stop).unwrap()];
    let body = json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": true, "stop": [stop, "never-there"]});
    assert_eq!(answer(&post(a, "/v1/completions", &body)), (want.to_string(), "stop".to_string()));
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (t, f, _) = stream_answer(&post(a, "/v1/completions", &sbody));
    assert_eq!((t.as_str(), f.as_str()), (want, "stop"));

    // Seeds: same seed, same text, as kiln run's sampler gives; another seed, another text.
    let sampled = |seed: u64| {
        let b = json!({"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": seed, "ignore_eos": true});
        answer(&post(a, "/v1/completions", &b)).0
    };
    let s7 = sampled(7);
    assert_eq!(s7, sampled(7));
    assert_ne!(s7, sampled(8));
    let params = SamplingParams { temperature: 1.0, seed: 7, ..Default::default() };
    assert_eq!(s7, session_text(&model, &ids, params, 24, false));

    // Logprobs: sorted alternatives; greedy picks the first.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            &id,
            "Hi",
            json!({"temperature": 0, "max_tokens": 5, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
        ),
    );
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content").clone();
    assert_eq!(content.len(), 5);
    for t in &content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(lps[0] >= lps[1] && lps[1] >= lps[2] && lps[0] <= 0.0, "{lps:?}");
        assert_eq!(t["logprob"], top[0]["logprob"]);
        assert_eq!(t["bytes"], top[0]["bytes"]);
    }

    // Tokenize / detokenize round trip.
    let ids = tokenize(a, "Hello world", false);
    let r = post(a, "/detokenize", &json!({"tokens": ids}));
    assert_eq!(r.json()["content"].as_str().unwrap().trim_start(), "Hello world");
    post(a, "/detokenize", &json!({"tokens": [5, 99999]})).error(400);

    // Bad input: a 4xx with an OpenAI error body each.
    let chat = "/v1/chat/completions";
    let raw = |body: &[u8]| request(a, "POST", chat, Some(body), Some(KEY));
    assert!(raw(b"{\"messages\": [").error(400).contains("invalid request body"));
    raw(b"").error(400);
    raw(b"[1, 2]").error(400);
    let msg = post(a, chat, &chat_body(&id, "x", json!({"temperature": "hot"}))).error(400);
    assert!(msg.contains("invalid type"), "{msg}");
    post(a, chat, &json!({"messages": "hello"})).error(400);
    assert!(post(a, chat, &json!({"model": id, "messages": []})).error(400).contains("empty"));
    post(a, chat, &json!({"messages": [{"content": "no role"}]})).error(400);
    post(a, chat, &json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})).error(400);
    for bad in [json!({"max_tokens": 0}), json!({"max_tokens": -5}), json!({"max_tokens": 1_000_000})] {
        let m = post(a, chat, &chat_body(&id, "x", bad)).error(400);
        assert!(m.contains("max_tokens"), "{m}");
    }
    post(a, chat, &chat_body(&id, "x", json!({"n": 2}))).error(400);
    post(a, chat, &chat_body(&id, "x", json!({"temperature": 5}))).error(400);
    post(a, chat, &chat_body(&id, "x", json!({"top_p": 1.5}))).error(400);
    post(a, chat, &chat_body(&id, "x", json!({"top_logprobs": 2}))).error(400);
    post(a, chat, &chat_body(&id, "x", json!({"logprobs": true, "top_logprobs": 21}))).error(400);
    post(a, chat, &chat_body("gpt-4", "x", json!({}))).error(404);
    let long = "word ".repeat(400);
    let r = post(a, chat, &chat_body(&id, &long, json!({})));
    assert!(r.error(400).contains("context holds 256"));
    assert_eq!(r.json()["error"]["code"], json!("context_length_exceeded"));
    post(a, "/v1/completions", &json!({"prompt": [1, 2, 5000]})).error(400);
    post(a, "/v1/completions", &json!({"prompt": ["a", "b"]})).error(400);
    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(70 << 10));
    request(a, "POST", "/v1/completions", Some(huge.as_bytes()), Some(KEY)).error(413);
    request(a, "GET", "/v2/nothing", None, Some(KEY)).error(404);
    request(a, "GET", chat, None, Some(KEY)).error(405);

    // …and the server still answers, with the same greedy text as before.
    let r = post(a, "/v1/chat/completions", &chat_body(&id, "Hello there", greedy));
    assert_eq!(answer(&r).0, text);

    // Metrics in Prometheus text format.
    let m = request(a, "GET", "/metrics", None, Some(KEY));
    assert_eq!(m.status, 200);
    for needle in [
        "kiln_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "kiln_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}",
        "kiln_queue_depth 0",
        "kiln_slots 4",
        "kiln_time_to_first_token_seconds_count",
        "kiln_tokens_per_second",
        "kiln_completion_tokens_total",
    ] {
        assert!(m.body.contains(needle), "metrics lack {needle}:\n{}", m.body);
    }
    srv.stop().unwrap();
}

/// Requests `n` completions at once (one thread each) and returns their texts in order.
fn concurrent(addr: SocketAddr, bodies: &[Value]) -> Vec<(String, String)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = bodies.iter().map(|b| s.spawn(move || answer(&post(addr, "/v1/completions", b)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A greedy request served with 7 others in the same batched steps gives exactly the text it
/// gives alone, and the text `kiln run`'s Session gives.
#[test]
fn synth_batching_does_not_change_greedy_output() {
    let model = load(&synth("Q4_K"));
    let srv = start(&model, |c| {
        c.parallel = 8;
        c.ctx = 512;
        c.api_key = Some(KEY.into());
    });
    let prompts = ["The quick brown fox", "a b c d e f g", "Once", "Numbers: 1, 2, 3", "x", "Hello world", "Q:", "zzz"];
    let body = |p: &str, n: usize| json!({"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": true});
    let alone = answer(&post(srv.addr, "/v1/completions", &body(prompts[0], 48))).0;
    let ids = tokenize(srv.addr, prompts[0], true);
    assert_eq!(alone, session_text(&model, &ids, SamplingParams::greedy(), 48, false));
    // Different lengths so that sequences join and leave at different steps.
    let bodies: Vec<Value> = prompts.iter().enumerate().map(|(i, p)| body(p, 48 - 4 * i)).collect();
    for round in 0..2 {
        let got = concurrent(srv.addr, &bodies);
        assert_eq!(got[0].0, alone, "round {round}: batched greedy text differs from the text served alone");
        for (i, (t, f)) in got.iter().enumerate() {
            assert_eq!(f, "length");
            let ids = tokenize(srv.addr, prompts[i], true);
            assert_eq!(t, &session_text(&model, &ids, SamplingParams::greedy(), 48 - 4 * i, false), "prompt {i}");
        }
    }
    srv.stop().unwrap();
}

/// Speculation changes no greedy output in the server, whatever its kind, with 6 requests decoded
/// together: prompt lookup (the server's default) and a draft model (here the model itself, so
/// every draft is accepted: `/metrics` shows drafted = accepted > 0) give the text of `kiln run`'s
/// plain Session; a request for a draft model where none is loaded, or with a bad field, is a 400.
#[test]
fn synth_speculation_changes_no_greedy_output() {
    let model = load(&synth("Q8_0"));
    let prompts =
        ["one two one two one two one", "a b c a b c a b", "Once", "The cat sat. The cat sat. The", "x y", "Q:"];
    let body = |p: &str, spec: Value| json!({"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "speculative": spec});
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let ids = model.tokenizer.encode(p, true, false).unwrap();
            session_text(&model, &ids, SamplingParams::greedy(), 40, false)
        })
        .collect();
    let srv = start(&model, |c| {
        c.parallel = 6;
        c.ctx = 256;
        c.draft = Some(kiln_server::DraftModelFile(model.clone()));
    });
    let metric = |name: &str| -> f64 {
        let m = request(srv.addr, "GET", "/metrics", None, None).body;
        m.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).expect(name)
    };
    let draft: Vec<Value> = prompts.iter().map(|p| body(p, json!({"mode": "draft", "draft_max": 6}))).collect();
    let got = concurrent(srv.addr, &draft);
    for (i, (t, _)) in got.iter().enumerate() {
        assert_eq!(t, &want[i], "draft model, prompt {i}");
    }
    let (drafted, accepted) = (metric("kiln_spec_drafted_tokens_total"), metric("kiln_spec_accepted_tokens_total"));
    assert!(drafted > 0.0 && drafted == accepted, "drafted {drafted}, accepted {accepted}");
    let ngram: Vec<Value> = prompts.iter().map(|p| body(p, json!({"mode": "ngram"}))).collect();
    for (i, (t, _)) in concurrent(srv.addr, &ngram).iter().enumerate() {
        assert_eq!(t, &want[i], "prompt lookup, prompt {i}");
    }
    for (spec, needle) in [
        (json!({"mode": "sideways"}), "unknown speculation mode"),
        (json!({"draft_max": 15}), "speculative must be in [0, 14]"),
        (json!({"n_max": 3}), "unknown field speculative.n_max"),
        (json!(4), "must be an object"),
    ] {
        let r = post(srv.addr, "/v1/completions", &body("x", spec.clone()));
        assert_eq!(r.status, 400, "{spec}: {}", r.body);
        assert!(r.body.contains(needle), "{spec}: {}", r.body);
    }
    srv.stop().unwrap();
    // Without a draft model, asking for one is a 400 naming the field.
    let srv = start(&model, |c| c.ctx = 256);
    let r = post(srv.addr, "/v1/completions", &body("x", json!({"mode": "draft"})));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("needs a draft model") && r.body.contains("\"param\":\"speculative\""), "{}", r.body);
    srv.stop().unwrap();
}

/// One slot, a queue of one: a third request is refused with 503 at once, the queued one is
/// served after the first, and a client that disconnects mid-stream frees the slot.
#[test]
fn synth_queue_limit_and_disconnect() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.parallel = 1;
        c.queue = 1;
        c.ctx = 4096;
        c.api_key = Some(KEY.into());
    });
    let a = srv.addr;
    let long = json!({"prompt": "Once", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true});
    // A long stream, read until its first token arrives, then abandoned.
    let mut first = send(a, "POST", "/v1/completions", Some(long.to_string().as_bytes()), Some(KEY));
    let mut buf = [0u8; 4096];
    let n = first.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The headers go out once the request is queued; wait until it holds the slot.
    let t0 = Instant::now();
    while request(a, "GET", "/health", None, None).json()["slots_processing"] != json!(1) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the first request never got the slot");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The slot is busy: the next request waits in the queue, the one after is refused.
    let queued = std::thread::spawn(move || {
        let b = json!({"prompt": "Hi", "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        answer(&post(a, "/v1/completions", &b))
    });
    let t0 = Instant::now();
    loop {
        let h = request(a, "GET", "/health", None, None).json();
        if h["queued"] == json!(1) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the second request never queued: {h}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 8}));
    assert!(r.error(503).contains("busy"));
    // Disconnect: the slot is freed at the next step and the queued request runs.
    drop(first);
    let (text, finish) = queued.join().unwrap();
    assert_eq!(finish, "length");
    assert!(!text.is_empty());
    let m = request(a, "GET", "/metrics", None, Some(KEY)).body;
    let generated: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("kiln_generated_tokens_total "))
        .and_then(|v| v.parse().ok())
        .expect("kiln_generated_tokens_total");
    // The abandoned stream stopped early instead of generating its 4000 tokens.
    assert!(generated < 4000 + 8, "generated {generated} tokens: the disconnected stream ran on");
    srv.stop().unwrap();
}

/// SmolLM2: a real answer, streamed and not, and the same greedy text with 7 other requests in flight.
#[test]
fn smollm2_chat_and_batching() {
    let Some(model) = smollm2("smollm2_chat_and_batching") else { return };
    let srv = start(&model, |c| {
        c.parallel = 8;
        c.ctx = 512;
        c.api_key = Some(KEY.into());
    });
    let (a, id) = (srv.addr, srv.model_id.clone());
    let q = |user: &str| chat_body(&id, user, json!({"temperature": 0, "max_tokens": 24}));
    let question = "What is the capital of France?";
    let (alone, _) = answer(&post(a, "/v1/chat/completions", &q(question)));
    assert!(alone.contains("Paris"), "{alone:?}");
    let mut sb = q(question);
    sb["stream"] = json!(true);
    assert_eq!(stream_answer(&post(a, "/v1/chat/completions", &sb)).0, alone);
    let others = [
        "Name three colors.",
        "What is 2 + 2?",
        "Write a haiku about the sea.",
        "Who wrote Hamlet?",
        "Say hello in Spanish.",
        "What is the largest planet?",
        "Count from 1 to 5.",
    ];
    let got = std::thread::scope(|s| {
        let mut hs = vec![s.spawn(|| answer(&post(a, "/v1/chat/completions", &q(question))))];
        for o in others {
            hs.push(s.spawn(move || answer(&post(a, "/v1/chat/completions", &q(o)))));
        }
        hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(got[0].0, alone, "greedy text changed when served with 7 others");
    for (t, _) in &got[1..] {
        assert!(!t.is_empty());
    }
    srv.stop().unwrap();
}

/// Runs tests/py/test_openai_client.py (the official `openai` package) against a server; skips
/// visibly where python3 or the package is missing.
fn run_python_client(test: &str, model: &Arc<Model>, expect_paris: bool) {
    let probe = std::process::Command::new("python3").args(["-c", "import openai; print(openai.__version__)"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: the openai Python package is missing (python3 -m pip install openai): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: python3 is not available ({e})");
            return;
        }
    }
    let srv = start(model, |c| {
        c.api_key = Some(KEY.into());
        c.ctx = 512;
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/test_openai_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .env("KILN_BASE_URL", format!("http://{}/v1", srv.addr))
        .env("KILN_API_KEY", KEY)
        .env("KILN_MODEL", &srv.model_id)
        .env("KILN_EXPECT_PARIS", if expect_paris { "1" } else { "0" })
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test}: the openai client tests failed");
    assert!(stdout.contains("ALL PASSED"), "{test}: {stdout}");
    srv.stop().unwrap();
}

#[test]
fn openai_python_client_synth() {
    run_python_client("openai_python_client_synth", &load(&synth("Q8_0")), false);
}

#[test]
fn openai_python_client_smollm2() {
    let Some(model) = smollm2("openai_python_client_smollm2") else { return };
    run_python_client("openai_python_client_smollm2", &model, true);
}

/// Shutdown: running streams finish or are cancelled within the grace period, each ending with
/// `[DONE]`; then the server is gone.
#[test]
fn synth_graceful_shutdown() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.parallel = 2;
        c.ctx = 4096;
        c.grace = Duration::from_millis(300);
    });
    let a = srv.addr;
    let long = json!({"prompt": "Once", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true});
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let body = long.to_string();
            std::thread::spawn(move || request(a, "POST", "/v1/completions", Some(body.as_bytes()), None))
        })
        .collect();
    let t0 = Instant::now();
    while request(a, "GET", "/health", None, None).json()["slots_processing"] != json!(2) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the streams never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t1 = Instant::now();
    srv.stop().unwrap();
    let took = t1.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?} with a grace period of 300 ms");
    for s in streams {
        let r = s.join().unwrap();
        assert_eq!(r.status, 200);
        let ev = r.events();
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{:?}", &ev[ev.len().saturating_sub(3)..]);
        // Either it finished in time, or it was cancelled with an error event before [DONE].
        let before = &ev[ev.len() - 2];
        assert!(before.contains("\"finish_reason\":\"length\"") || before.contains("shut down"), "{before}");
    }
    assert!(TcpStream::connect(a).is_err(), "still accepting connections after shutdown");
}
