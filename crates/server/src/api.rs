//! The endpoints: chat and text completions (JSON or server-sent events), models, health,
//! metrics, tokenize/detokenize.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::scheduler::{Event, EventSink, Finish, FinishReason, Request, TokenLogprob};
use kiln_engine::Model;
use kiln_tokenizer::template::ChatMessage;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;
use crate::openai::{self, ChatRequest, CompletionRequest, DetokenizeRequest, Job, Prompt, TokenizeRequest};
use crate::AppState;

type St = State<Arc<AppState>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The scheduler's side of a request's event channel.
struct ChannelSink(UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut chain = String::new();
        let mut cur: Option<&dyn std::error::Error> = Some(&e);
        while let Some(c) = cur {
            chain.push_str(&c.to_string());
            cur = c.source();
        }
        if chain.contains("length limit") {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("reading the request body: {e}"))
        }
    })
}

/// `model` may be left out; when given it must name the loaded model (with or without `.gguf`).
fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Ok(()),
        Some(m) if m == st.model_id || m.strip_suffix(".gguf") == Some(&st.model_id) => Ok(()),
        Some(m) => Err(ApiError {
            param: Some("model"),
            ..ApiError::not_found(
                format!("the model {m:?} does not exist: this server serves {:?}", st.model_id),
                "model_not_found",
            )
        }),
    }
}

/// Tokenizes a rendered chat prompt: specials parsed, BOS added when the model asks for it and
/// the template did not write it already (as `kiln run` does).
fn encode_rendered(model: &Model, text: &str) -> Result<Vec<u32>, ApiError> {
    let tok = &model.tokenizer;
    let mut ids = tok.encode(text, false, true).map_err(|e| ApiError::bad_request(format!("tokenizing: {e}")))?;
    if let Some(bos) = tok.bos() {
        if tok.add_bos() && ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

pub async fn chat(State(st): St, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: ChatRequest = openai::parse(&bytes)?;
    check_model(&st, req.sampling.model.as_deref())?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_param("messages", "messages must not be empty"));
    }
    let job = req.sampling.job(req.max_completion_tokens.or(req.sampling.max_tokens), st.cfg.ctx)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::bad_param("top_logprobs", "top_logprobs needs logprobs: true")),
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::bad_param("top_logprobs", format!("top_logprobs must be in [0, 20], got {k}")));
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if m.role.is_empty() {
            return Err(ApiError::bad_param("messages", "every message needs a role"));
        }
        // The newer name of the system role; templates know only "system".
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        msgs.push(ChatMessage::new(role, m.text()?));
    }
    let text = match &st.model.template {
        Some(t) => t.render(&msgs, true).map_err(|e| ApiError::bad_param("messages", format!("{e}")))?,
        // No template: a plain transcript that ends where the assistant speaks.
        None => {
            let mut s: String = msgs.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
            s.push_str("assistant:");
            s
        }
    };
    let prompt = encode_rendered(&st.model, &text)?;
    generate(st, prompt, job, logprobs, Kind::Chat).await
}

pub async fn completions(State(st): St, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: CompletionRequest = openai::parse(&bytes)?;
    check_model(&st, req.sampling.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(ApiError::bad_param("echo", "echo is not supported"));
    }
    if req.logprobs.is_some_and(|l| l > 0) {
        return Err(ApiError::bad_param("logprobs", "logprobs are supported on /v1/chat/completions only"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::bad_param("best_of", "only best_of = 1 is supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_param("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    let job = req.sampling.job(req.sampling.max_tokens, st.cfg.ctx)?;
    let tok = &st.model.tokenizer;
    let encode = |text: &str| {
        tok.encode(text, true, true).map_err(|e| ApiError::bad_param("prompt", format!("tokenizing: {e}")))
    };
    let one = |n: usize| ApiError::bad_param("prompt", format!("a list of {n} prompts: only one prompt per request"));
    let prompt = match &req.prompt {
        Prompt::Text(t) => encode(t)?,
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Texts(v) if v.len() == 1 => encode(&v[0])?,
        Prompt::TokenLists(v) if v.len() == 1 => v[0].clone(),
        Prompt::Texts(v) => return Err(one(v.len())),
        Prompt::TokenLists(v) => return Err(one(v.len())),
    };
    let n_vocab = st.model.weights.cfg.n_vocab;
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(ApiError::bad_param(
            "prompt",
            format!("token id {t} is out of range (the vocabulary has {n_vocab} tokens)"),
        ));
    }
    generate(st, prompt, job, None, Kind::Completion).await
}

/// Queues the request and answers with its result (JSON) or its stream (SSE).
async fn generate(
    st: Arc<AppState>,
    prompt: Vec<u32>,
    job: Job,
    logprobs: Option<usize>,
    kind: Kind,
) -> Result<Response, ApiError> {
    if st.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let param = if kind == Kind::Chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::bad_param(param, "the prompt is empty: nothing to generate from"));
    }
    let n_ctx = st.cfg.ctx;
    if prompt.len() >= n_ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad_param(
                param,
                format!(
                    "the prompt has {} tokens but the context holds {n_ctx} (with room for at least one generated token)",
                    prompt.len()
                ),
            )
        });
    }
    let room = n_ctx - prompt.len();
    let (tx, rx) = unbounded_channel();
    let req = Request {
        prompt,
        params: job.params,
        max_tokens: job.max_tokens.unwrap_or(room).min(room),
        stop: job.stop,
        stop_at_eog: !job.ignore_eos,
        logprobs,
        sink: Box::new(ChannelSink(tx)),
        submitted: Instant::now(),
    };
    st.stats.queued.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = st.queue.try_send(req) {
        st.stats.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(match e {
            std::sync::mpsc::TrySendError::Full(_) => ApiError::unavailable(format!(
                "the server is busy ({} requests already queued); retry later",
                st.cfg.queue
            )),
            std::sync::mpsc::TrySendError::Disconnected(_) => ApiError::unavailable("the server is shutting down"),
        });
    }
    let relay = Relay {
        st,
        rx,
        kind,
        id: openai::new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: openai::unix_now(),
        include_usage: job.include_usage,
        logprobs: logprobs.is_some(),
        out: VecDeque::new(),
        finished: false,
    };
    if job.stream {
        let stream = futures_util::stream::unfold(relay, |mut r| async move {
            loop {
                if let Some(e) = r.out.pop_front() {
                    return Some((Ok::<_, Infallible>(e), r));
                }
                if r.finished {
                    return None;
                }
                let ev = r.rx.recv().await;
                r.on_event(ev);
            }
        });
        Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
    } else {
        collect(relay).await
    }
}

/// Relays one request's scheduler events to its client.
struct Relay {
    st: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    created: u64,
    include_usage: bool,
    logprobs: bool,
    /// Server-sent events ready to go.
    out: VecDeque<SseEvent>,
    finished: bool,
}

impl Relay {
    fn model(&self) -> &str {
        &self.st.model_id
    }

    fn chunk(&self, delta_or_text: Value, logprobs: Option<&[TokenLogprob]>, finish: Option<&str>) -> Value {
        let lp = match logprobs {
            Some(l) if self.logprobs => json!({ "content": logprobs_json(l) }),
            _ => Value::Null,
        };
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": delta_or_text, "logprobs": lp, "finish_reason": finish}),
            Kind::Completion => json!({"index": 0, "text": delta_or_text, "logprobs": lp, "finish_reason": finish}),
        };
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model(),
            "system_fingerprint": fingerprint(), "choices": [choice],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn push(&mut self, v: Value) {
        self.out.push_back(SseEvent::default().data(v.to_string()));
    }

    fn fail(&mut self, e: ApiError) {
        self.push(e.body());
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.finished = true;
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            None => self.fail(ApiError::internal("the scheduler stopped")),
            Some(Event::Started { .. }) => {
                if self.kind == Kind::Chat {
                    let c = self.chunk(json!({"role": "assistant", "content": ""}), None, None);
                    self.push(c);
                }
            }
            Some(Event::Delta { text, logprobs }) => {
                if text.is_empty() && logprobs.is_empty() {
                    return;
                }
                let d = if self.kind == Kind::Chat { json!({ "content": text }) } else { json!(text) };
                let c = self.chunk(d, Some(&logprobs), None);
                self.push(c);
            }
            Some(Event::Done(f)) => {
                if f.reason == FinishReason::Cancelled {
                    return self.fail(ApiError::unavailable("the server shut down before the request finished"));
                }
                self.st.metrics.record_finish(&f);
                let empty = if self.kind == Kind::Chat { json!({}) } else { json!("") };
                let c = self.chunk(empty, None, Some(finish_reason(&f)));
                self.push(c);
                if self.include_usage {
                    let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
                    let u = json!({
                        "id": self.id, "object": object, "created": self.created, "model": self.model(),
                        "system_fingerprint": fingerprint(), "choices": [], "usage": usage(&f),
                    });
                    self.push(u);
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.finished = true;
            }
            Some(Event::Error(e)) => {
                let err = self.scheduler_error(e);
                self.fail(err)
            }
        }
    }

    fn scheduler_error(&self, e: String) -> ApiError {
        if self.st.shutting_down.load(Ordering::SeqCst) {
            ApiError::unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

/// Waits for the whole generation and answers with one JSON body.
async fn collect(mut r: Relay) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match r.rx.recv().await {
            None => return Err(ApiError::internal("the scheduler stopped")),
            Some(Event::Started { .. }) => {}
            Some(Event::Delta { text: t, logprobs }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Event::Error(e)) => return Err(r.scheduler_error(e)),
            Some(Event::Done(f)) => {
                if f.reason == FinishReason::Cancelled {
                    return Err(ApiError::unavailable("the server shut down before the request finished"));
                }
                r.st.metrics.record_finish(&f);
                let lp = if r.logprobs { json!({ "content": logprobs_json(&lps) }) } else { Value::Null };
                let (object, choice) = match r.kind {
                    Kind::Chat => (
                        "chat.completion",
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                               "logprobs": lp, "finish_reason": finish_reason(&f)}),
                    ),
                    Kind::Completion => (
                        "text_completion",
                        json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(&f)}),
                    ),
                };
                let body = json!({
                    "id": r.id, "object": object, "created": r.created, "model": r.model(),
                    "system_fingerprint": fingerprint(), "choices": [choice], "usage": usage(&f),
                });
                return Ok(Json(body).into_response());
            }
        }
    }
}

fn fingerprint() -> String {
    format!("kiln-{}", env!("CARGO_PKG_VERSION"))
}

fn finish_reason(f: &Finish) -> &'static str {
    match f.reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

fn logprobs_json(l: &[TokenLogprob]) -> Value {
    let entry = |bytes: &[u8], logprob: f32| json!({"token": String::from_utf8_lossy(bytes), "logprob": logprob, "bytes": bytes});
    Value::Array(
        l.iter()
            .map(|t| {
                let mut e = entry(&t.bytes, t.logprob);
                e["top_logprobs"] = Value::Array(t.top.iter().map(|(_, b, lp)| entry(b, *lp)).collect());
                e
            })
            .collect(),
    )
}

fn model_json(st: &AppState) -> Value {
    let c = &st.model.weights.cfg;
    json!({
        "id": st.model_id, "object": "model", "created": st.created, "owned_by": "kiln",
        "meta": {"n_ctx": st.cfg.ctx, "n_ctx_train": c.n_ctx_train, "n_vocab": c.n_vocab,
                 "n_slots": st.cfg.parallel, "path": st.model.path.display().to_string()},
    })
}

pub async fn models(State(st): St) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_json(&st)]}))
}

pub async fn model(State(st): St, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&st, Some(&id))?;
    Ok(Json(model_json(&st)))
}

pub async fn health(State(st): St) -> Response {
    let s = &st.stats;
    let busy = s.active.load(Ordering::SeqCst);
    let body = json!({
        "status": if st.shutting_down.load(Ordering::SeqCst) { "shutting down" } else { "ok" },
        "slots_idle": st.cfg.parallel.saturating_sub(busy),
        "slots_processing": busy,
        "queued": s.queued.load(Ordering::SeqCst),
    });
    let code = if st.shutting_down.load(Ordering::SeqCst) { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

pub async fn metrics(State(st): St) -> Response {
    let text = st.metrics.render(&st.stats, st.cfg.parallel);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

pub async fn tokenize(State(st): St, body: Body) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: TokenizeRequest = openai::parse(&bytes)?;
    let tok = &st.model.tokenizer;
    let ids = tok
        .encode(&req.content, req.add_special, req.parse_special.unwrap_or(true))
        .map_err(|e| ApiError::bad_param("content", format!("tokenizing: {e}")))?;
    if !req.with_pieces {
        return Ok(Json(json!({ "tokens": ids })));
    }
    let pieces: Vec<Value> = ids
        .iter()
        .map(|&id| {
            let p = tok.token_to_piece(id).unwrap_or_default();
            json!({"id": id, "piece": String::from_utf8_lossy(&p)})
        })
        .collect();
    Ok(Json(json!({ "tokens": pieces })))
}

pub async fn detokenize(State(st): St, body: Body) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: DetokenizeRequest = openai::parse(&bytes)?;
    let tok = &st.model.tokenizer;
    if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= tok.n_vocab()) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {t} is out of range (the vocabulary has {} tokens)", tok.n_vocab()),
        ));
    }
    let text = tok.decode(&req.tokens).map_err(|e| ApiError::bad_param("tokens", format!("{e}")))?;
    Ok(Json(json!({ "content": text })))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(format!("{method} is not allowed on {}", uri.path()))
    }
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()), "unknown_url")
}
