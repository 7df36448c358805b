//! The endpoints: chat and text completions (JSON or server-sent events), models, health,
//! metrics, tokenize/detokenize.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::constraint::Constraint;
use kiln_engine::scheduler::{Event, EventSink, Finish, FinishReason, Place, Request, TokenLogprob};
use kiln_engine::Model;
use kiln_tokenizer::template::ChatMessage;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::openai::{self, ChatRequest, CompletionRequest, DetokenizeRequest, Job, Prompt, TokenizeRequest};
use crate::structured;
use crate::tool_calls::{self, CallParser, ParseEvent};
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
            param: Some("model".into()),
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

/// Runs CPU-heavy request work (template rendering, tokenizing, compiling a constraint) on the
/// blocking pool, so that the async workers stay free for other connections (`/health` answers
/// while large prompts are tokenized).
async fn off_runtime<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("{what}: {e}")))?
}

/// [`off_runtime`] for work bounded only by the body limit (`/tokenize`, `/detokenize`), at most
/// one job per core at once: a flood of such requests then waits its turn instead of taking the CPU
/// from the scheduler's forward passes. (A generation request's text is bounded by the context
/// before it is tokenized: [`check_prompt_bytes`].)
async fn off_runtime_per_core<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    static CORES: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let cores =
        CORES.get_or_init(|| Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))));
    // The semaphore is never closed.
    let turn = cores.clone().acquire_owned().await.map_err(|e| ApiError::internal(format!("{what}: {e}")))?;
    // The turn ends with the work, not with this future: a request dropped meanwhile (its client
    // left) cannot stop the work, which still holds its core.
    off_runtime(what, move || {
        let _turn = turn;
        work()
    })
    .await
}

/// The most bytes of text one token of `model` can stand for: its longest token text (SentencePiece
/// writes a space as the 3-byte `▁`, byte-level BPE a byte as a 1- or 2-byte character, so a token's
/// text is never shorter than the input it covers), and at least 4 (an unknown character). Computed
/// once per model.
fn longest_token_bytes(model: &Arc<Model>) -> usize {
    static KNOWN: Mutex<Vec<(Weak<Model>, usize)>> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    known.retain(|(m, _)| m.strong_count() > 0);
    if let Some((_, n)) = known.iter().find(|(m, _)| std::ptr::eq(m.as_ptr(), Arc::as_ptr(model))) {
        return *n;
    }
    let tok = &model.tokenizer;
    let n = (0..tok.n_vocab() as u32).filter_map(|id| tok.token_text(id)).map(str::len).max().unwrap_or(0).max(4);
    known.push((Arc::downgrade(model), n));
    n
}

/// Refuses, before tokenizing it, a prompt text too long for the context whatever its tokens: one
/// of more than `(ctx - 1) × longest token` bytes needs at least `ctx` tokens, and a prompt must
/// leave room for one generated token. Tokenizing it would only spend CPU time.
fn check_prompt_bytes(st: &AppState, text: &str, param: &'static str) -> Result<(), ApiError> {
    let per_token = longest_token_bytes(&st.model);
    let limit = st.cfg.ctx.saturating_sub(1).saturating_mul(per_token);
    if text.len() <= limit {
        return Ok(());
    }
    Err(ApiError {
        code: Some("context_length_exceeded"),
        ..ApiError::bad_param(
            param,
            format!(
                "the prompt is {} bytes, more than the context of {} tokens can hold (at most {limit} bytes: \
                 {per_token} bytes for the longest token)",
                text.len(),
                st.cfg.ctx
            ),
        )
    })
}

/// 503 for a scheduler that has died: nothing can be generated until the server is restarted.
fn scheduler_failed(reason: &str) -> ApiError {
    ApiError {
        code: Some("scheduler_failed"),
        ..ApiError::unavailable(format!("the scheduler failed ({reason}); this server cannot generate until restarted"))
    }
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
    let s = &req.sampling;
    let mut constraint =
        structured::constraint_fields(s.response_format.as_ref(), s.json_schema.as_ref(), s.grammar.as_ref())?;
    let tools = structured::tool_use(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        st.model.template.as_ref(),
    )?;
    if let Some(t) = &tools {
        if let Some(spec) = t.constraint() {
            if let Some((_, field)) = &constraint {
                return Err(ApiError::bad_param(
                    field,
                    format!("{field} cannot be combined with a tool_choice that forces a call"),
                ));
            }
            constraint = Some((spec, "tool_choice"));
        } else if let (Some((_, field)), true) = (&constraint, t.parses_calls()) {
            return Err(ApiError::bad_param(
                field,
                format!("{field} with tools is not supported: the output could not contain a call"),
            ));
        }
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if m.role.is_empty() {
            return Err(ApiError::bad_param("messages", "every message needs a role"));
        }
        // The newer name of the system role; templates know only "system".
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        let mut msg = ChatMessage::new(role, m.text()?);
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
            let v = tool_calls::calls_for_template(calls).map_err(|e| ApiError::bad_param("messages", e))?;
            msg.tool_calls = Some(
                serde_json::from_value(v).map_err(|e| ApiError::bad_param("messages", format!("tool_calls: {e}")))?,
            );
        }
        msg.tool_call_id = m.tool_call_id.clone();
        msg.name = m.name.clone();
        msgs.push(msg);
    }
    // Rendering, tokenizing and compiling a schema can take a while on large inputs: off the
    // async runtime, so that other connections are not held up.
    let st2 = st.clone();
    let prepared = off_runtime("preparing the request", move || {
        let model = &st2.model;
        let text = match &model.template {
            Some(t) => {
                let tools_json = match &tools {
                    Some(t) => Some(
                        serde_json::from_value(t.raw.clone())
                            .map_err(|e| ApiError::bad_param("tools", format!("{e}")))?,
                    ),
                    None => None,
                };
                t.render_with_tools(&msgs, tools_json.as_ref(), true)
                    .map_err(|e| ApiError::bad_param("messages", format!("{e}")))?
            }
            // No template: a plain transcript that ends where the assistant speaks.
            None => {
                let mut s: String = msgs.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
                s.push_str("assistant:");
                s
            }
        };
        check_prompt_bytes(&st2, &text, "messages")?;
        let prompt = encode_rendered(model, &text)?;
        let compiled = structured::compile(model, constraint.as_ref(), tools.as_ref())?;
        Ok((prompt, compiled, tools))
    })
    .await;
    let (prompt, compiled, tools) = prepared?;
    let calls = tools.and_then(|t| t.parser());
    generate(st, prompt, job, compiled, Output { logprobs, calls }, Kind::Chat).await
}

pub async fn completions(State(st): St, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: CompletionRequest = openai::parse(&bytes)?;
    check_model(&st, req.sampling.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(ApiError::bad_param("echo", "echo is not supported"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::bad_param("logprobs", format!("logprobs must be in [0, 20], got {k}")));
        }
        Some(k) => Some(k as usize),
    };
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::bad_param("best_of", "only best_of = 1 is supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_param("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    let job = req.sampling.job(req.sampling.max_tokens, st.cfg.ctx)?;
    let one = |n: usize| ApiError::bad_param("prompt", format!("a list of {n} prompts: only one prompt per request"));
    // A text prompt is tokenized below, off the async runtime; token ids are taken as they are.
    let (text, ids) = match req.prompt {
        Prompt::Text(t) => (Some(t), Vec::new()),
        Prompt::Tokens(ids) => (None, ids),
        Prompt::Texts(mut v) if v.len() == 1 => (v.pop(), Vec::new()),
        Prompt::TokenLists(mut v) if v.len() == 1 => (None, v.pop().unwrap_or_default()),
        Prompt::Texts(v) => return Err(one(v.len())),
        Prompt::TokenLists(v) => return Err(one(v.len())),
    };
    let n_vocab = st.model.weights.cfg.n_vocab;
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(ApiError::bad_param(
            "prompt",
            format!("token id {t} is out of range (the vocabulary has {n_vocab} tokens)"),
        ));
    }
    if let Some(t) = &text {
        check_prompt_bytes(&st, t, "prompt")?;
    }
    let s = &req.sampling;
    let constraint =
        structured::constraint_fields(s.response_format.as_ref(), s.json_schema.as_ref(), s.grammar.as_ref())?;
    let (prompt, compiled) = if text.is_none() && constraint.is_none() {
        (ids, None)
    } else {
        let st2 = st.clone();
        off_runtime("preparing the request", move || {
            let model = &st2.model;
            let prompt = match text {
                Some(t) => model
                    .tokenizer
                    .encode(&t, true, true)
                    .map_err(|e| ApiError::bad_param("prompt", format!("tokenizing: {e}")))?,
                None => ids,
            };
            let compiled = match constraint {
                Some(c) => structured::compile(model, Some(&c), None)?,
                None => None,
            };
            Ok((prompt, compiled))
        })
        .await?
    };
    generate(st, prompt, job, compiled, Output { logprobs, calls: None }, Kind::Completion).await
}

/// How a request's output is reported besides its text.
struct Output {
    /// `Some(k)`: each token's log-probability and its `k` most likely alternatives.
    logprobs: Option<usize>,
    /// The model's native tool-call format, parsed out of the text into `tool_calls`.
    calls: Option<Box<dyn CallParser>>,
}

/// Queues the request and answers with its result (JSON) or its stream (SSE).
async fn generate(
    st: Arc<AppState>,
    prompt: Vec<u32>,
    job: Job,
    constraint: Option<Constraint>,
    output: Output,
    kind: Kind,
) -> Result<Response, ApiError> {
    let logprobs = output.logprobs;
    if let Some(reason) = st.stats.failure() {
        return Err(scheduler_failed(reason));
    }
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
    let spec = job.spec.resolve(st.cfg.spec);
    if spec.mode == kiln_engine::speculative::SpecMode::Draft && st.cfg.draft.is_none() {
        return Err(ApiError::bad_param(
            "speculative",
            "speculative.mode \"draft\" needs a draft model, and this server has none (serve --model-draft FILE)",
        ));
    }
    // Admitted while fewer than slots + queue requests are running or waiting; the place is given
    // back when the request ends or this handler is dropped (the client went away).
    let capacity = st.cfg.parallel.saturating_add(st.cfg.queue);
    let Some(place) = st.stats.try_enter(capacity) else {
        if let Some(reason) = st.stats.failure() {
            return Err(scheduler_failed(reason));
        }
        return Err(ApiError::unavailable(format!(
            "the server is busy ({} requests running, {} queued: the queue is full); retry later",
            st.stats.active.load(Ordering::SeqCst),
            st.stats.queued.load(Ordering::SeqCst)
        )));
    };
    let client_place = place.share();
    let (tx, rx) = unbounded_channel();
    let req = Request {
        prompt,
        params: job.params,
        max_tokens: job.max_tokens.unwrap_or(room).min(room),
        stop: job.stop,
        stop_at_eog: !job.ignore_eos,
        spec,
        logprobs,
        constraint,
        token_deltas: false,
        sink: Box::new(ChannelSink(tx)),
        submitted: Instant::now(),
        place,
    };
    if st.queue.send(req).is_err() {
        // The scheduler has stopped: it failed, or the server is shutting down.
        return Err(match st.stats.failure() {
            Some(reason) => scheduler_failed(reason),
            None => ApiError::unavailable("the server is shutting down"),
        });
    }
    let relay = Relay {
        st,
        _place: client_place,
        rx,
        kind,
        id: openai::new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: openai::unix_now(),
        include_usage: job.include_usage,
        logprobs: logprobs.is_some(),
        calls: output.calls,
        n_calls: 0,
        held_logprobs: Vec::new(),
        text_offset: 0,
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
        // A comment every 250 ms while no event comes (waiting for a slot, reading a long
        // prompt): the transport takes a FIN as a half-close, so a client that went away is only
        // found by a write failing (the second after it left), which drops this stream and gives
        // its place back.
        Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_millis(250))).into_response())
    } else {
        collect(relay).await
    }
}

/// Relays one request's scheduler events to its client.
struct Relay {
    st: Arc<AppState>,
    /// The client's handle on the request's place: dropped with the relay when the client goes.
    _place: Place,
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    created: u64,
    include_usage: bool,
    logprobs: bool,
    /// Parses tool calls out of the text (chat with tools).
    calls: Option<Box<dyn CallParser>>,
    /// Tool calls sent so far.
    n_calls: usize,
    /// Log-probabilities of text the call parser holds back, sent with the next chunk.
    held_logprobs: Vec<TokenLogprob>,
    /// Characters of output before the next log-probability entry (completions' `text_offset`).
    text_offset: usize,
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
            Some(l) if self.logprobs => match self.kind {
                Kind::Chat => json!({ "content": logprobs_json(l) }),
                Kind::Completion => completion_logprobs_json(l, self.text_offset),
            },
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
            None => {
                let err = self.stopped();
                self.fail(err)
            }
            Some(Event::Started { .. }) => {
                if self.kind == Kind::Chat {
                    let c = self.chunk(json!({"role": "assistant", "content": ""}), None, None);
                    self.push(c);
                }
            }
            Some(Event::Delta { text, logprobs, .. }) => self.on_text(text, logprobs),
            Some(Event::Done(f)) => {
                if f.reason == FinishReason::Cancelled {
                    return self.fail(ApiError::unavailable("the server shut down before the request finished"));
                }
                if let Some(mut p) = self.calls.take() {
                    let events = p.finish();
                    let lps = std::mem::take(&mut self.held_logprobs);
                    self.send_parsed(events, lps);
                }
                self.st.metrics.record_finish(&f);
                let empty = if self.kind == Kind::Chat { json!({}) } else { json!("") };
                // A call cut short by max_tokens is reported as such: `length`, as OpenAI does.
                let reason = match f.reason {
                    FinishReason::Stop if self.n_calls > 0 => "tool_calls",
                    _ => finish_reason(&f),
                };
                let c = self.chunk(empty, None, Some(reason));
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

    /// Streams a piece of generated text: as it is, or through the tool-call parser.
    fn on_text(&mut self, text: String, mut logprobs: Vec<TokenLogprob>) {
        if let Some(p) = self.calls.as_mut() {
            let events = p.push(&text);
            let mut lps = std::mem::take(&mut self.held_logprobs);
            lps.append(&mut logprobs);
            return self.send_parsed(events, lps);
        }
        if text.is_empty() && logprobs.is_empty() {
            return;
        }
        let d = if self.kind == Kind::Chat { json!({ "content": text }) } else { json!(text) };
        let c = self.chunk(d, Some(&logprobs), None);
        // Offsets follow the tokens' texts (text held back for a stop string is sent later, but
        // its tokens' offsets are where it stands in the output).
        self.text_offset += logprobs.iter().map(|t| t.text.chars().count()).sum::<usize>();
        self.push(c);
    }

    /// Sends the tool-call parser's events as content and `tool_calls` deltas (OpenAI's stream
    /// shape: the call's id, type and name first, then its arguments). Log-probabilities ride on
    /// the first chunk; with nothing to send they wait for the next.
    fn send_parsed(&mut self, events: Vec<ParseEvent>, lps: Vec<TokenLogprob>) {
        let mut lps = Some(lps);
        for ev in events {
            match ev {
                ParseEvent::Content(t) if t.is_empty() => {}
                ParseEvent::Content(t) => {
                    let c = self.chunk(json!({ "content": t }), lps.take().as_deref(), None);
                    self.push(c);
                }
                ParseEvent::Call { index, name, arguments } => {
                    let id = call_id(&self.id, index);
                    let head = json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                                      "function": {"name": name, "arguments": ""}}]});
                    let c = self.chunk(head, lps.take().as_deref(), None);
                    self.push(c);
                    let args = json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]});
                    let c = self.chunk(args, None, None);
                    self.push(c);
                    self.n_calls += 1;
                }
            }
        }
        if let Some(l) = lps.filter(|l| !l.is_empty()) {
            self.held_logprobs = l;
        }
    }

    fn scheduler_error(&self, e: String) -> ApiError {
        if let Some(reason) = self.st.stats.failure() {
            scheduler_failed(reason)
        } else if self.st.shutting_down.load(Ordering::SeqCst) {
            ApiError::unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }

    /// The scheduler dropped the request without a last event: it stopped.
    fn stopped(&self) -> ApiError {
        match self.st.stats.failure() {
            Some(reason) => scheduler_failed(reason),
            None => ApiError::internal("the scheduler stopped"),
        }
    }
}

/// Waits for the whole generation and answers with one JSON body.
async fn collect(mut r: Relay) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match r.rx.recv().await {
            None => return Err(r.stopped()),
            Some(Event::Started { .. }) => {}
            Some(Event::Delta { text: t, logprobs, .. }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Event::Error(e)) => return Err(r.scheduler_error(e)),
            Some(Event::Done(f)) => {
                if f.reason == FinishReason::Cancelled {
                    return Err(ApiError::unavailable("the server shut down before the request finished"));
                }
                r.st.metrics.record_finish(&f);
                let (object, choice) = match r.kind {
                    Kind::Chat => {
                        let lp = if r.logprobs { json!({ "content": logprobs_json(&lps) }) } else { Value::Null };
                        let mut message = json!({"role": "assistant", "content": text});
                        let mut reason = finish_reason(&f);
                        if let Some(mut p) = r.calls.take() {
                            let mut events = p.push(&text);
                            events.extend(p.finish());
                            let (content, calls) = split_calls(&r.id, events);
                            if !calls.is_empty() {
                                if f.reason == FinishReason::Stop {
                                    reason = "tool_calls";
                                }
                                message["tool_calls"] = Value::Array(calls);
                            }
                            message["content"] = content.map(Value::String).unwrap_or(Value::Null);
                        }
                        (
                            "chat.completion",
                            json!({"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}),
                        )
                    }
                    Kind::Completion => {
                        let lp = if r.logprobs { completion_logprobs_json(&lps, 0) } else { Value::Null };
                        (
                            "text_completion",
                            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(&f)}),
                        )
                    }
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

/// The content (`None` when the model wrote only calls) and the OpenAI `tool_calls` of a
/// finished output.
fn split_calls(id: &str, events: Vec<ParseEvent>) -> (Option<String>, Vec<Value>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for ev in events {
        match ev {
            ParseEvent::Content(t) => content.push_str(&t),
            ParseEvent::Call { index, name, arguments } => calls.push(json!({
                "id": call_id(id, index), "type": "function",
                "function": {"name": name, "arguments": arguments},
            })),
        }
    }
    let content = if calls.is_empty() || !content.trim().is_empty() { Some(content) } else { None };
    (content, calls)
}

/// A tool call's id: unique per response and call.
fn call_id(response_id: &str, index: usize) -> String {
    let tail = response_id.rsplit('-').next().unwrap_or(response_id);
    format!("call_{tail}_{index}")
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

/// The legacy completions form: parallel lists of tokens, their log-probabilities, the
/// alternatives as `{token: logprob}` maps, and each token's character offset in the text. A
/// token is the text it added to the output (so the tokens make up the text, and the offsets
/// index it); in the maps the chosen token has that key, the others their own text, or OpenAI's
/// `bytes:\xNN…` form where that is not UTF-8 or would repeat a key.
fn completion_logprobs_json(l: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(l.len());
    for t in l {
        offsets.push(at);
        at += t.text.chars().count();
    }
    let top = |t: &TokenLogprob| {
        let mut m = serde_json::Map::new();
        for (id, bytes, lp) in &t.top {
            let key = if *id == t.token { t.text.clone() } else { utf8_or_bytes(bytes) };
            let key = if m.contains_key(&key) { bytes_form(bytes) } else { key };
            m.entry(key).or_insert(json!(lp));
        }
        Value::Object(m)
    };
    json!({
        "tokens": l.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": l.iter().map(top).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn utf8_or_bytes(b: &[u8]) -> String {
    std::str::from_utf8(b).map(str::to_string).unwrap_or_else(|_| bytes_form(b))
}

/// OpenAI's spelling of a token that is not text on its own: `bytes:\xe2\x80`.
fn bytes_form(b: &[u8]) -> String {
    let mut s = String::from("bytes:");
    for x in b {
        s.push_str(&format!("\\x{x:02x}"));
    }
    s
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
    let failure = s.failure();
    let shutting_down = st.shutting_down.load(Ordering::SeqCst);
    let mut body = json!({
        "status": if failure.is_some() { "scheduler failed" } else if shutting_down { "shutting down" } else { "ok" },
        "slots_idle": st.cfg.parallel.saturating_sub(busy),
        "slots_processing": busy,
        "queued": s.queued.load(Ordering::SeqCst),
    });
    if let Some(reason) = failure {
        body["error"] = json!(reason);
    }
    let code = if failure.is_some() || shutting_down { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

pub async fn metrics(State(st): St) -> Response {
    let text = st.metrics.render(&st.stats, st.cfg.parallel);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Text to token ids, off the async runtime (a body-limit-sized text takes a while), the answer
/// serialized there too. Not capped by the context: counting the tokens of a text too long to
/// generate from is a use of its own.
pub async fn tokenize(State(st): St, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: TokenizeRequest = openai::parse(&bytes)?;
    let body = off_runtime_per_core("tokenizing", move || {
        let tok = &st.model.tokenizer;
        let ids = tok
            .encode(&req.content, req.add_special, req.parse_special.unwrap_or(true))
            .map_err(|e| ApiError::bad_param("content", format!("tokenizing: {e}")))?;
        let v = if req.with_pieces {
            let pieces: Vec<Value> = ids
                .iter()
                .map(|&id| {
                    let p = tok.token_to_piece(id).unwrap_or_default();
                    json!({"id": id, "piece": String::from_utf8_lossy(&p)})
                })
                .collect();
            json!({ "tokens": pieces })
        } else {
            json!({ "tokens": ids })
        };
        Ok(v.to_string())
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub async fn detokenize(State(st): St, body: Body) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, st.cfg.body_limit).await?;
    let req: DetokenizeRequest = openai::parse(&bytes)?;
    let n_vocab = st.model.tokenizer.n_vocab();
    if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {t} is out of range (the vocabulary has {n_vocab} tokens)"),
        ));
    }
    let text = off_runtime_per_core("detokenizing", move || {
        st.model.tokenizer.decode(&req.tokens).map_err(|e| ApiError::bad_param("tokens", format!("{e}")))
    })
    .await?;
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
