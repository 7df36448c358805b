//! The HTTP transport against hostile and odd clients, over real sockets to a server started
//! in-process: slowloris headers, idle keep-alives, slow bodies, more connections than the cap,
//! half-closed clients, auth header forms, and the per-request time limit. Every test ends by
//! checking that a normal request still gets the right answer.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_engine::{GenerateOptions, Model, Sampler, SamplingParams, Session};
use kiln_model::Precision;
use kiln_server::{Config, Running};
use serde_json::{json, Value};

mod common;

use common::dechunk;

const KEY: &str = "test-key-123";

fn synth() -> Arc<Model> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    let p: PathBuf = d.join("synth-tiny-Q8_0.gguf");
    Arc::new(Model::load(&p).expect("model loads"))
}

fn start(model: &Arc<Model>, edit: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    cfg.ctx = 512;
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

    /// A response header's value (names compared in any case).
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// Asserts an OpenAI-style error with this status; returns its `code`.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "headers: {}\nbody: {}", self.headers, self.body);
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "not an OpenAI error: {}", self.body);
        v["error"]["code"].clone()
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        assert_eq!(self.header("content-type").as_deref(), Some("text/event-stream"), "{}", self.headers);
        self.body
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
            .collect()
    }
}

/// The request's bytes: `Connection: close` unless `keep_alive`.
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    auth: Option<&str>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    out
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Parses a whole response (the connection closed after it).
fn parse(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.into() };
    Resp { status, headers: head.to_string(), body }
}

fn request_with(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, auth: Option<&str>) -> Resp {
    let mut s = connect(addr);
    s.write_all(&request_bytes(addr, method, path, body, auth, false)).unwrap();
    let mut raw = Vec::new();
    // A reset after the answer (a server closing with input unread) keeps what was read.
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    request_with(addr, "GET", path, None, None)
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    let auth = format!("Bearer {KEY}");
    request_with(addr, "POST", path, Some(body.to_string().as_bytes()), Some(&auth))
}

/// Reads one response with a Content-Length from a kept-alive connection.
fn read_one(s: &mut TcpStream) -> Resp {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = parse(&raw[..end + 4]);
            let len: usize = r.header("content-length").and_then(|v| v.parse().ok()).expect("content-length");
            if raw.len() >= end + 4 + len {
                return Resp { body: String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into(), ..r };
            }
        }
        let n = s.read(&mut buf).expect("reading a response");
        assert!(n > 0, "the connection closed mid-response: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Waits (up to `limit`) for the server to close `s`; panics if it does not. Returns how long
/// that took.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => t0.elapsed(),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => t0.elapsed(),
        Ok(n) => panic!("unexpected bytes from the server: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => panic!("the server kept the connection open for {:?}: {e}", t0.elapsed()),
    }
}

/// Polls `f` until it is true or `limit` passes.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PROMPT: &str = "Once upon a time";

fn greedy(max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

/// What a greedy 16-token completion of PROMPT must say (as `kiln run` computes it).
fn expected(model: &Model) -> String {
    let prompt = model.tokenizer.encode(PROMPT, true, true).expect("tokenize");
    let mut s = Session::new(model, 512, Precision::Fast);
    let opts = GenerateOptions { max_tokens: 16, stop: vec![], stop_at_eog: false };
    s.generate(&prompt, &opts, &mut Sampler::new(SamplingParams::greedy()), |_| true).expect("generate").text
}

/// The completion's text, asserting a 200.
fn text_of(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().expect("text").to_string()
}

/// /health answers ok and a normal completion gives the right text.
fn assert_serves(addr: SocketAddr, want: &str) {
    let h = get(addr, "/health");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(text_of(&post(addr, "/v1/completions", &greedy(16, false))), want);
}

/// Hundreds of connections sending a header byte a second are closed after the header timeout;
/// /health and completions answer meanwhile and afterwards.
#[test]
fn slowloris_headers_are_cut_off() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| c.header_timeout = Duration::from_secs(2));
    let a = srv.addr;
    const N: usize = 200;
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: ";
    let mut conns: Vec<Option<TcpStream>> = (0..N)
        .map(|_| {
            let s = TcpStream::connect(a).expect("connect");
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    let t0 = Instant::now();
    let mut round = 0;
    let mut checked_service = false;
    while conns.iter().any(Option::is_some) {
        assert!(t0.elapsed() < Duration::from_secs(30), "slowloris connections still open after 30 s");
        for c in conns.iter_mut() {
            let Some(s) = c else { continue };
            let byte = head.get(round).copied().unwrap_or(b'a');
            let mut buf = [0u8; 64];
            let closed = match s.read(&mut buf) {
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => s.write(&[byte]).is_err(),
                Err(_) => true,
            };
            if closed {
                *c = None;
            }
        }
        if !checked_service {
            // While they hold their connections, others are served.
            assert_serves(a, &want);
            checked_service = true;
        }
        round += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    // All closed by the header clock: after 2 s, not after the 30 s bound.
    assert!(round >= 2, "closed after {round} rounds: too soon for a 2 s header timeout");
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// A kept-alive connection is closed after the idle timeout; the idle clock and the header
/// clock are separate (a long idle wait is allowed, a slow head after it is not).
#[test]
fn idle_keepalive_is_closed() {
    let model = synth();
    let want = expected(&model);
    // Short idle clock, long header clock: an idle connection closes after ~1 s.
    let srv = start(&model, |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.header_timeout = Duration::from_secs(30);
    });
    let a = srv.addr;
    let mut s = connect(a);
    for _ in 0..2 {
        s.write_all(&request_bytes(a, "GET", "/health", None, None, true)).unwrap();
        assert_eq!(read_one(&mut s).status, 200);
    }
    let took = wait_closed(&mut s, Duration::from_secs(15));
    assert!(took >= Duration::from_millis(500), "closed {took:?} after the response: before the idle timeout");
    assert_serves(a, &want);
    srv.stop().unwrap();

    // Long idle clock, short header clock.
    let srv = start(&model, |c| {
        c.idle_timeout = Duration::from_secs(30);
        c.header_timeout = Duration::from_secs(1);
    });
    let a = srv.addr;
    let mut s = connect(a);
    s.write_all(&request_bytes(a, "GET", "/health", None, None, true)).unwrap();
    assert_eq!(read_one(&mut s).status, 200);
    // Idle past the header timeout: still open, and serves the next request.
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(&request_bytes(a, "GET", "/health", None, None, true)).unwrap();
    assert_eq!(read_one(&mut s).status, 200);
    // The next head begins and stalls: closed by the header clock.
    s.write_all(b"GET /health HT").unwrap();
    let took = wait_closed(&mut s, Duration::from_secs(15));
    assert!(took >= Duration::from_millis(500), "closed {took:?} after the first byte: before the header timeout");
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// A body that trickles in gets 408 once the body timeout passes, and the connection closes.
#[test]
fn slow_body_gets_408() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| {
        c.body_timeout = Duration::from_secs(1);
        c.api_key = Some(KEY.into());
    });
    let a = srv.addr;
    let body = greedy(16, false).to_string();
    let req = request_bytes(a, "POST", "/v1/completions", Some(body.as_bytes()), Some(&format!("Bearer {KEY}")), false);
    let split = req.len() - body.len() + 5;
    let mut s = connect(a);
    s.write_all(&req[..split]).unwrap();
    let mut w = s.try_clone().unwrap();
    let rest = req[split..].to_vec();
    let trickle = std::thread::spawn(move || {
        for b in rest.iter().take(rest.len() - 1) {
            std::thread::sleep(Duration::from_millis(300));
            if w.write_all(&[*b]).is_err() {
                return;
            }
        }
    });
    let t0 = Instant::now();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse(&raw);
    assert_eq!(r.error(408), json!("request_timeout"));
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(t0.elapsed() < Duration::from_secs(20), "the 408 took {:?}", t0.elapsed());
    trickle.join().unwrap();
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// Past --max-connections a new connection gets 503 with Retry-After at once; service resumes
/// when the held connections close.
#[test]
fn connections_over_the_cap_get_503() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| {
        c.max_connections = 8;
        c.header_timeout = Duration::from_secs(60);
        c.api_key = Some(KEY.into());
    });
    let a = srv.addr;
    let held: Vec<TcpStream> = (0..8).map(|_| connect(a)).collect();
    for _ in 0..5 {
        let t0 = Instant::now();
        let r = get(a, "/health");
        assert_eq!(r.error(503), json!("overloaded"));
        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{}", r.headers);
        assert!(t0.elapsed() < Duration::from_secs(10), "the 503 took {:?}", t0.elapsed());
    }
    drop(held);
    eventually("service after the held connections closed", Duration::from_secs(20), || {
        get(a, "/health").status == 200
    });
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// A client that shuts down its sending side after the request still gets the answer.
#[test]
fn half_closed_client_gets_its_answer() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| c.api_key = Some(KEY.into()));
    let a = srv.addr;
    let auth = format!("Bearer {KEY}");
    for (stream, keep_alive) in [(false, false), (false, true), (true, false)] {
        let body = greedy(16, stream).to_string();
        let mut s = connect(a);
        s.write_all(&request_bytes(a, "POST", "/v1/completions", Some(body.as_bytes()), Some(&auth), keep_alive))
            .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("reading the answer");
        let r = parse(&raw);
        if stream {
            assert_eq!(r.status, 200, "{}", r.body);
            let ev = r.events();
            assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
            let text: String = ev[..ev.len() - 1]
                .iter()
                .map(|e| {
                    serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string()
                })
                .collect();
            assert_eq!(text, want);
        } else {
            assert_eq!(text_of(&r), want, "keep-alive: {keep_alive}");
        }
    }
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// 401 names the scheme (WWW-Authenticate: Bearer); the scheme is matched in any case; a 503
/// from a full queue carries Retry-After.
#[test]
fn auth_headers_and_retry_after() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| {
        c.api_key = Some(KEY.into());
        c.parallel = 1;
        c.queue = 1;
        c.ctx = 4096;
    });
    let a = srv.addr;
    for auth in [None, Some("Bearer wrong".to_string()), Some(format!("Basic {KEY}")), Some(format!("Bearer{KEY}"))] {
        let r = request_with(a, "GET", "/v1/models", None, auth.as_deref());
        assert_eq!(r.error(401), json!("invalid_api_key"), "{auth:?}");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"), "{}", r.headers);
    }
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let r = request_with(a, "GET", "/v1/models", None, Some(&format!("{scheme} {KEY}")));
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
    }

    // The one slot busy with a long stream and the queue full: the next request gets 503 with
    // Retry-After.
    let auth = format!("Bearer {KEY}");
    let long = json!({"prompt": "Once", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut first = connect(a);
    first
        .write_all(&request_bytes(a, "POST", "/v1/completions", Some(long.to_string().as_bytes()), Some(&auth), false))
        .unwrap();
    eventually("the stream holds the slot", Duration::from_secs(10), || {
        get(a, "/health").json()["slots_processing"] == json!(1)
    });
    let queued = std::thread::spawn(move || text_of(&post(a, "/v1/completions", &greedy(16, false))));
    eventually("the second request is queued", Duration::from_secs(10), || {
        get(a, "/health").json()["queued"] == json!(1)
    });
    let r = post(a, "/v1/completions", &greedy(4, false));
    assert_eq!(r.error(503), json!("overloaded"));
    assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{}", r.headers);
    drop(first);
    assert_eq!(queued.join().unwrap(), want);
    assert_serves(a, &want);
    srv.stop().unwrap();
}

/// --request-timeout: a long stream ends with an error event and [DONE] and frees its slot; a
/// long non-streamed request gets 504.
#[test]
fn request_timeout_ends_long_requests() {
    let model = synth();
    let want = expected(&model);
    let srv = start(&model, |c| {
        c.request_timeout = Some(Duration::from_secs(1));
        c.ctx = 16384;
        c.parallel = 1;
        c.api_key = Some(KEY.into());
    });
    let a = srv.addr;
    // 16000 tokens take several seconds at the least.
    let t0 = Instant::now();
    let r = post(a, "/v1/completions", &greedy(16000, true));
    assert!(t0.elapsed() < Duration::from_secs(30), "the stream ran {:?}", t0.elapsed());
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{:?}", &ev[ev.len().saturating_sub(3)..]);
    assert!(ev.len() >= 3, "no tokens before the cut: {ev:?}");
    let err: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], json!("timeout"), "{err}");
    for e in &ev[..ev.len() - 2] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v["choices"][0]["finish_reason"].is_null(), "the stream finished before the limit: {e}");
    }
    eventually("the cut stream frees its slot", Duration::from_secs(10), || {
        get(a, "/health").json()["slots_processing"] == json!(0)
    });

    let t0 = Instant::now();
    let r = post(a, "/v1/completions", &greedy(16000, false));
    assert_eq!(r.error(504), json!("timeout"));
    assert!(t0.elapsed() < Duration::from_secs(30), "the 504 took {:?}", t0.elapsed());
    eventually("the cut request frees its slot", Duration::from_secs(10), || {
        get(a, "/health").json()["slots_processing"] == json!(0)
    });
    assert_serves(a, &want);
    srv.stop().unwrap();
}
