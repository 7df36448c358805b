//! Admission control against a real server: a request is admitted while fewer than
//! `parallel + queue` requests are running or waiting, waits while every slot is busy, gets 503
//! with `Retry-After` only when the queue is full, and a waiting client that goes away gives its
//! place back at once. Slots are kept busy by long greedy generations (`ignore_eos`) whose streams
//! are left unread; dropping the connections ends them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_engine::Model;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::{dechunk, load};

fn synth(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(format!("synth-tiny-{name}.gguf"))
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

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        let _ = s.write_all(b);
    }
    s
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    let mut s = send(addr, method, path, body);
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
    request(addr, "POST", path, Some(body.to_string().as_bytes()))
}

fn health(addr: SocketAddr) -> Value {
    request(addr, "GET", "/health", None).json()
}

/// Polls `/health` until `cond` holds for it (generous bound: the machine may be loaded).
fn wait_health(addr: SocketAddr, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let h = health(addr);
        if cond(&h) {
            return h;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}: {h}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A streamed generation that holds its slot for seconds (thousands of tokens, end-of-text
/// ignored).
fn long_stream() -> Vec<u8> {
    json!({"prompt": "Once", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true})
        .to_string()
        .into_bytes()
}

/// Reads a response's head (status line and headers) and leaves the connection open; a 503 is
/// read to its end and its body returned.
fn open(mut s: TcpStream) -> (TcpStream, Resp) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("reading the response head");
        assert!(n > 0, "connection closed before the response head: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let mut body = rest.to_string();
    if status != 200 {
        let mut more = Vec::new();
        let _ = s.read_to_end(&mut more);
        body.push_str(&String::from_utf8_lossy(&more));
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
    }
    (s, Resp { status, headers: head.to_string(), body })
}

/// What a streamed response delivers in the next 600 ms (it may be keep-alive comments only).
fn received(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_millis(600) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `n` long streamed generations at once and reads their response heads: the admitted ones
/// (200, their connections kept open) and the refused ones (503).
fn flood(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<Resp>) {
    let body = long_stream();
    let sent: Vec<TcpStream> = (0..n).map(|_| send(addr, "POST", "/v1/completions", Some(&body))).collect();
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for s in sent {
        let (s, r) = open(s);
        match r.status {
            200 => admitted.push(s),
            503 => refused.push(r),
            other => panic!("unexpected status {other}: {}", r.body),
        }
    }
    (admitted, refused)
}

/// A refusal for a full queue: 503, `Retry-After`, an OpenAI error saying so.
fn assert_busy(r: &Resp) {
    assert_eq!(r.status, 503, "{}", r.body);
    let retry = r.header("retry-after").unwrap_or_else(|| panic!("no Retry-After: {}", r.headers));
    assert!(retry.parse::<u32>().is_ok_and(|s| s >= 1), "Retry-After: {retry}");
    let v = r.json();
    assert_eq!(v["error"]["code"], json!("overloaded"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"), "{v}");
}

/// After the hostile part: the server is idle again and answers a normal request correctly.
fn still_serves(addr: SocketAddr) {
    wait_health(addr, "every slot and place to be given back", |h| {
        h["slots_processing"] == json!(0) && h["queued"] == json!(0)
    });
    let b = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0,
                   "ignore_eos": true});
    let r = post(addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], json!("length"), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], json!(8), "{v}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{v}");
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let m = request(addr, "GET", "/metrics", None).body;
    m.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
}

/// `--parallel 8 --queue 1`: 10 requests at once → all 8 slots run, 1 waits, 1 is refused
/// (before, 5–6 of 8 were refused with slots free).
#[test]
fn eight_slots_and_a_queue_of_one() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.parallel = 8;
        c.queue = 1;
        c.ctx = 4096;
    });
    let a = srv.addr;
    let (admitted, refused) = flood(a, 10);
    assert_eq!((admitted.len(), refused.len()), (9, 1), "admitted and refused of 10");
    assert_busy(&refused[0]);
    let h = wait_health(a, "8 running and 1 waiting", |h| h["slots_processing"] == json!(8));
    assert_eq!((h["queued"].clone(), h["slots_idle"].clone()), (json!(1), json!(0)), "{h}");
    assert_eq!(metric(a, "kiln_queue_depth"), 1.0);
    // Still full: the next one is refused too.
    assert_busy(&post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4})));
    drop(admitted);
    still_serves(a);
    srv.stop().unwrap();
}

/// `--parallel 4 --queue 8`: of 40 requests at once exactly 12 are admitted (before: 10).
#[test]
fn four_slots_and_a_queue_of_eight() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.parallel = 4;
        c.queue = 8;
        c.ctx = 4096;
    });
    let a = srv.addr;
    let (admitted, refused) = flood(a, 40);
    assert_eq!((admitted.len(), refused.len()), (12, 28), "admitted and refused of 40");
    refused.iter().for_each(assert_busy);
    let h = wait_health(a, "4 running", |h| h["slots_processing"] == json!(4));
    assert_eq!(h["queued"], json!(8), "{h}");
    drop(admitted);
    still_serves(a);
    srv.stop().unwrap();
}

/// A waiting client that disconnects leaves the queue at once, while the slot stays busy: `queued`
/// drops and a new request is admitted in its place.
#[test]
fn a_waiting_client_that_disconnects_frees_its_place() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| {
        c.parallel = 1;
        c.queue = 2;
        c.ctx = 4096;
    });
    let a = srv.addr;
    let body = long_stream();
    let (running, r) = open(send(a, "POST", "/v1/completions", Some(&body)));
    assert_eq!(r.status, 200);
    wait_health(a, "the first request to run", |h| h["slots_processing"] == json!(1));
    let (mut waiting, r) = open(send(a, "POST", "/v1/completions", Some(&body)));
    assert_eq!(r.status, 200);
    let (leaving, r) = open(send(a, "POST", "/v1/completions", Some(&body)));
    assert_eq!(r.status, 200);
    wait_health(a, "two waiting", |h| h["queued"] == json!(2));
    assert_busy(&post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4})));
    drop(leaving);
    let h = wait_health(a, "the departed client's place to be freed", |h| h["queued"] == json!(1));
    assert_eq!(h["slots_processing"], json!(1), "{h}");
    // …while the first request still holds the slot: the other waiting one has had nothing but
    // keep-alive comments.
    let so_far = received(&mut waiting);
    assert!(!so_far.contains("data:"), "the waiting request started: {so_far}");
    // Its place is free: a new request is admitted (and waits).
    let (newcomer, r) = open(send(a, "POST", "/v1/completions", Some(&body)));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_health(a, "the newcomer to wait", |h| h["queued"] == json!(2));
    // The queue is full again.
    assert_busy(&post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4})));
    drop((running, waiting, newcomer));
    still_serves(a);
    srv.stop().unwrap();
}

/// A prompt text longer than any tokenization of it could fit in the context is refused before it
/// is tokenized (chat and completions); `/tokenize` still counts its tokens.
#[test]
fn a_prompt_too_long_for_any_tokenization_is_refused_unread() {
    let model = load(&synth("Q8_0"));
    let srv = start(&model, |c| c.ctx = 256);
    let a = srv.addr;
    let huge = "abcdefgh ".repeat(40_000);
    let check = |r: Resp, param: &str| {
        assert_eq!(r.status, 400, "{}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["code"], json!("context_length_exceeded"), "{v}");
        assert_eq!(v["error"]["param"], json!(param), "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        // The chat's count includes its template's text.
        assert!(m.contains("bytes, more than the context of 256 tokens can hold"), "{m}");
    };
    check(post(a, "/v1/completions", &json!({"prompt": huge, "max_tokens": 4})), "prompt");
    check(post(a, "/v1/completions", &json!({"prompt": [huge], "max_tokens": 4})), "prompt");
    check(post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": huge}]})), "messages");
    let r = post(a, "/tokenize", &json!({"content": huge}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["tokens"].as_array().unwrap().len() > 256);
    // A prompt under the byte bound that still has too many tokens is refused after tokenizing.
    let r = post(a, "/v1/completions", &json!({"prompt": "word ".repeat(400), "max_tokens": 4}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("tokens but the context holds 256"), "{}", r.body);
    still_serves(a);
    srv.stop().unwrap();
}

/// A scheduler that dies (a panic, as a bug would cause; injected at its fifth step) fails what
/// it holds and takes the server down with it, loudly: the running stream ends with an error event
/// naming the panic instead of hanging, a queued non-streamed request gets an error, and the
/// server stops (its serve loop returns the reason) instead of answering 503 forever while
/// `/health` says ok.
#[test]
fn a_scheduler_panic_fails_its_requests_and_stops_the_server() {
    let model = load(&synth("Q8_0"));
    let mut server = Some(start(&model, |c| {
        c.parallel = 1;
        c.fault_scheduler_panic_at_step = Some(5);
    }));
    let addr = server.as_ref().unwrap().addr;
    let (mut stream, head) = open(send(addr, "POST", "/v1/completions", Some(&long_stream())));
    assert_eq!(head.status, 200, "{}", head.body);
    // Queued behind it (one slot): fails too.
    let queued =
        send(addr, "POST", "/v1/completions", Some(json!({"prompt": "Hi", "max_tokens": 4}).to_string().as_bytes()));
    let mut rest = Vec::new();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.read_to_end(&mut rest).expect("the stream ends (no hang)");
    let text = dechunk(&(head.body + &String::from_utf8_lossy(&rest)));
    assert!(text.contains("\"error\"") && text.contains("fault injection"), "{text}");
    let mut raw = Vec::new();
    let mut queued = queued;
    let _ = queued.read_to_end(&mut raw);
    let queued_text = String::from_utf8_lossy(&raw);
    assert!(queued_text.starts_with("HTTP/1.1 5"), "{queued_text}");
    // The server goes away by itself (within its 200 ms check), and its thread ends with the
    // reason; meanwhile /health says the scheduler failed.
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_ok() {
        if let Ok(h) = std::panic::catch_unwind(|| request(addr, "GET", "/health", None)) {
            assert!(h.status == 503 && h.body.contains("scheduler failed"), "{}: {}", h.status, h.body);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the server is still listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = server.take().unwrap().stop().expect_err("the server stops with an error");
    assert!(format!("{err:#}").contains("scheduler thread stopped"), "{err:#}");
}
