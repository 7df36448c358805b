//! Continuous batching: several sequences decode together, one batched forward step per token.
//!
//! A [`Scheduler`] owns a fixed number of slots, each with its own KV cache and the tokens whose
//! keys and values that cache holds. Between steps it admits queued requests into free slots
//! (choosing the slot whose cached tokens share the longest prefix with the new prompt, so a
//! follow-up turn of a conversation only evaluates its new tokens) and drops finished or cancelled
//! ones. Each step runs one [`forward_batch`] over every active slot: one token for each sequence
//! that is generating, a chunk of prompt for each that is still reading its prompt. Sampling,
//! incremental UTF-8 decoding and stop-string handling are per sequence and follow
//! [`crate::Session::generate`] (same [`Sampler`], same order of accept/sample), so a seeded request
//! gives the text `kiln run` gives for the same prompt and parameters.
//!
//! The scheduler knows nothing about HTTP: requests come in over a channel and results go out
//! through each request's [`EventSink`].
//!
//! Admission is counted, not left to the channel: a submitter takes a [`Place`] from
//! [`SchedulerStats::try_enter`] (refused once `slots + queue` requests are running or waiting),
//! and the place is given back when the request is dropped or its client goes away, whichever
//! comes first. The scheduler moves arrivals into its own wait list at every step (and every 50 ms
//! while idle) and drops the waiting requests whose client is gone, so a vanished client neither
//! keeps a place nor gets a slot.
//!
//! A panic inside the scheduler (a bug, or a size that slipped through) fails every request it
//! holds with an error event, records the reason in [`SchedulerStats::failure`] and ends
//! [`Scheduler::run`], so that whoever serves can report it instead of hanging.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_model::{forward_batch, KvCache, Logits, Precision, SeqStep, Workspace};
use kiln_tokenizer::StreamDecoder;

use crate::backend::{BlockUse, PagedBackend, PagedStep};
use crate::constraint::Constraint;
use crate::kv_events::{BlockTracker, KvEventSink};
use crate::session::{find_stop, held_back};
use crate::speculative::{DraftModel, SpecMode, SpecOptions, Speculator};
use crate::{Model, Sampler, SamplingParams};

/// One generation request.
pub struct Request {
    /// Prompt token ids (already templated and tokenized); not empty, shorter than the slot context.
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Most tokens to generate; generation also ends when the slot's context is full.
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop at end-of-generation tokens.
    pub stop_at_eog: bool,
    /// `Some(k)`: report each generated token's log-probability and its `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// What the output must match (JSON schema, grammar); compiled before queuing.
    pub constraint: Option<Constraint>,
    /// Speculative decoding for this request (a draft model only where the scheduler has one:
    /// [`Scheduler::with_draft`]).
    pub spec: SpecOptions,
    /// Send a [`Event::Delta`] for every generated token, even one whose text is not final yet
    /// (a client that detokenizes itself, e.g. a Dynamo frontend); needs `stop` empty, since
    /// text held back for a stop string would otherwise be sent.
    pub token_deltas: bool,
    /// Where this request's events go.
    pub sink: Box<dyn EventSink>,
    /// When the request was queued (for queue time).
    pub submitted: Instant,
    /// The request's place among those running or waiting; given back when the request is dropped.
    pub place: Place,
}

/// The receiving end of a request's events, e.g. a channel to an HTTP handler.
pub trait EventSink: Send {
    /// Delivers an event; `false` when nobody listens any more (the sequence is then cancelled).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the listener is gone; checked before every step, so a client that disconnects
    /// frees its slot at the next step even while its output is held back.
    fn is_closed(&self) -> bool;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The request got a slot; `cached_tokens` prompt tokens were reused from the slot's cache.
    Started { prompt_tokens: usize, cached_tokens: usize },
    /// Generated text that is now final (never half a UTF-8 character, never part of a stop
    /// string), the ids of the tokens generated since the previous delta, and their
    /// log-probabilities when those were asked.
    Delta { text: String, tokens: Vec<u32>, logprobs: Vec<TokenLogprob> },
    /// The last event of a request that ran.
    Done(Finish),
    /// The request failed (bad prompt, model error, shutdown); the last event.
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's bytes (a piece of a multi-byte character may not be valid UTF-8 alone).
    pub bytes: Vec<u8>,
    /// What the token added to the output text: its bytes as decoded in place (empty for the
    /// first bytes of a character another token completes, which then carries the character;
    /// without a first-token space the tokenizer drops). The texts of all tokens make the output.
    pub text: String,
    /// Natural-log probability under the model's distribution (softmax of the raw logits).
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first, as (token, bytes, logprob).
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// Cancelled by the server (shutdown).
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the slot's cache instead of being evaluated.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds from submission to getting a slot, to the first token, and to the end.
    pub queue_seconds: f64,
    pub first_token_seconds: f64,
    pub total_seconds: f64,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Slots: sequences decoded together.
    pub n_slots: usize,
    /// Context (KV cache positions) of each slot.
    pub n_ctx: usize,
    pub precision: Precision,
    /// Most prompt tokens evaluated in one step over all slots, when no sequence is generating
    /// (at least [`MIN_CHUNK`]). While others generate, a step reads fewer (see [`Pace`]), so a
    /// long prompt is read in chunks between their tokens instead of stalling them.
    pub prefill_budget: usize,
    /// Fault injection for tests of whoever serves: the scheduler panics at this step, as a bug
    /// would (its requests fail, [`SchedulerStats::failure`] says why, [`Scheduler::run`] ends).
    #[doc(hidden)]
    pub panic_at_step: Option<u64>,
}

/// The fewest prompt tokens read in one step (unless the prompt is shorter). From this many
/// tokens a step's rows take the prompt (matrix-matrix) kernels, whose result for a token does not
/// depend on how many tokens share the step; a shorter chunk would take the generation kernels and
/// give the prompt other bits than reading it whole (as `kiln run` does).
pub const MIN_CHUNK: usize = kiln_quant::gemm::MIN_TOKENS;

/// Cached tokens for which a request takes a slot holding another sequence's cache rather than
/// an empty slot: one KV block ([`crate::kv_events::KV_EVENT_BLOCK`]).
const MIN_REUSE: usize = crate::kv_events::KV_EVENT_BLOCK;

/// Counters the scheduler keeps up to date, read by whoever reports metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Requests that hold a [`Place`] but no slot yet: exactly those waiting.
    pub queued: AtomicUsize,
    /// Requests that hold a [`Place`]: running or waiting.
    pub in_system: AtomicUsize,
    /// Slots holding a running request.
    pub active: AtomicUsize,
    pub prompt_tokens_evaluated: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Speculative decoding: verifications (steps of a sequence with drafted tokens), drafted
    /// tokens, and those accepted.
    pub spec_verifications: AtomicU64,
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    /// Time spent in forward steps, in microseconds.
    pub busy_micros: AtomicU64,
    /// A paged KV cache's blocks (GPU backend; zero on the CPU): used by running sequences,
    /// cached for prefix sharing, and in all.
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_cached: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Set when the scheduler died (a panic): why. It serves nothing after that.
    pub failure: OnceLock<String>,
}

impl SchedulerStats {
    /// Takes a place for a new request if fewer than `capacity` requests are running or waiting;
    /// `None` when the system is full or the scheduler has failed.
    pub fn try_enter(self: &Arc<Self>, capacity: usize) -> Option<Place> {
        if self.failure.get().is_some() {
            return None;
        }
        self.in_system.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < capacity).then_some(n + 1)).ok()?;
        self.queued.fetch_add(1, Ordering::SeqCst);
        Some(Place(Arc::new(PlaceState { stats: self.clone(), state: AtomicU8::new(WAITING) })))
    }

    /// Why the scheduler died, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

const WAITING: u8 = 0;
const RUNNING: u8 = 1;
const LEFT: u8 = 2;

/// A request's place in the system, counted in [`SchedulerStats::in_system`] (and in
/// [`SchedulerStats::queued`] until it gets a slot). Its handles ([`Place::share`]) are held by the
/// request and by whoever waits for the request's events: the place is given back as soon as the
/// first of them is dropped, so a client that goes away frees its place at once, and a request
/// that ends (finished, failed, refused, dropped while waiting) frees it on every path.
pub struct Place(Arc<PlaceState>);

struct PlaceState {
    stats: Arc<SchedulerStats>,
    state: AtomicU8,
}

impl Place {
    /// Another handle on the same place.
    pub fn share(&self) -> Place {
        Place(self.0.clone())
    }

    /// Whether the place was given back (a handle was dropped).
    pub fn is_gone(&self) -> bool {
        self.0.state.load(Ordering::SeqCst) == LEFT
    }

    /// The request got a slot: it no longer counts as queued. `false` when the place was given
    /// back already (the client left).
    fn start(&self) -> bool {
        let ok = self.0.state.compare_exchange(WAITING, RUNNING, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if ok {
            self.0.stats.queued.fetch_sub(1, Ordering::SeqCst);
        }
        ok
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let s = &self.0.stats;
        match self.0.state.swap(LEFT, Ordering::SeqCst) {
            WAITING => {
                s.queued.fetch_sub(1, Ordering::SeqCst);
                s.in_system.fetch_sub(1, Ordering::SeqCst);
            }
            RUNNING => {
                s.in_system.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.state.load(Ordering::SeqCst) {
            WAITING => "waiting",
            RUNNING => "running",
            _ => "left",
        };
        f.debug_tuple("Place").field(&state).finish()
    }
}

struct Slot<'m> {
    cache: KvCache,
    /// Tokens whose keys and values are in `cache`, in order.
    tokens: Vec<u32>,
    /// How many leading `tokens` were computed by the prompt kernels (chunks of at least
    /// [`MIN_CHUNK`]); the rest by the generation kernels. A cached position is reused only where
    /// a fresh computation of the new prompt would take the same kernels ([`reusable`]).
    prompt_kernel_len: usize,
    /// How many leading `tokens` are unchanged since the KV events were last told
    /// ([`Scheduler::with_kv_events`]).
    kv_told: usize,
    /// Tokens to feed at the next step.
    feed: Vec<u32>,
    /// Step counter value when the slot was last used (least recently used wins ties).
    last_used: u64,
    seq: Option<Sequence<'m>>,
    /// The slot's draft model state ([`Scheduler::with_draft`]); lent to a sequence that drafts
    /// with it.
    draft: Option<DraftModel<'m>>,
}

struct Sequence<'m> {
    req: Request,
    sampler: Sampler,
    constraint: Option<Constraint>,
    decoder: StreamDecoder<'m>,
    /// Prompt tokens not yet evaluated.
    prompt_left: Vec<u32>,
    cached_tokens: usize,
    generated: usize,
    /// Text decoded but not yet sent, because it may be the start of a stop string.
    pending: String,
    logprobs: Vec<TokenLogprob>,
    /// Tokens generated since the last delta.
    tokens: Vec<u32>,
    admitted: Instant,
    first_token: Option<Instant>,
    /// The sequence's drafting, when it speculates.
    speculator: Option<Speculator<'m>>,
    /// Tokens drafted after the last sampled one, fed with it at the next step.
    drafts: Vec<u32>,
}

pub struct Scheduler<'m> {
    model: &'m Model,
    /// The steps' forward pass and KV cache when they are not the CPU's (the slots' own caches
    /// are then empty): a paged cache shared by the slots ([`Scheduler::paged`]).
    paged: Option<Box<dyn PagedBackend + 'm>>,
    cfg: SchedulerConfig,
    slots: Vec<Slot<'m>>,
    /// Requests taken off the channel that wait for a slot, oldest first.
    waiting: VecDeque<Request>,
    ws: Workspace,
    step_no: u64,
    pace: Pace,
    stats: Arc<SchedulerStats>,
    /// Where KV block events go, and (on the CPU) what the slots' caches hold.
    kv_events: Option<(BlockTracker, Box<dyn KvEventSink>)>,
}

/// Recent step times, from which the prompt work of a step that others generate in is sized.
#[derive(Debug, Default)]
struct Pace {
    /// Seconds of a step without prompt tokens.
    decode_secs: Option<f64>,
    /// Seconds one prompt token adds to a step.
    prompt_token_secs: Option<f64>,
}

impl Pace {
    /// Weight of the newest step in the running averages.
    const NEW: f64 = 0.25;
    /// Prompt work a step may add while others generate, in decode steps: their gap between
    /// tokens stays under 3× its unloaded value (the bar is 4×, with room for noise).
    const EXTRA: f64 = 2.0;

    fn record(&mut self, prompt_tokens: usize, decode_tokens: usize, secs: f64) {
        let avg = |v: &mut Option<f64>, x: f64| *v = Some(v.map_or(x, |v| v + Self::NEW * (x - v)));
        if prompt_tokens == 0 {
            avg(&mut self.decode_secs, secs);
        } else {
            let base = if decode_tokens > 0 { self.decode_secs.unwrap_or(0.0) } else { 0.0 };
            avg(&mut self.prompt_token_secs, (secs - base).max(0.0) / prompt_tokens as f64);
        }
    }

    /// Prompt tokens for a step in which other sequences generate: about as many as take
    /// [`Pace::EXTRA`] times a step without them, so that the gap between those sequences'
    /// tokens stays near `1 + EXTRA` times its unloaded value while a long prompt is read. At least
    /// [`MIN_CHUNK`] (smaller chunks would change the prompt's results, and the prompt kernels
    /// cost a fixed time per step, so the gap may be longer), at most `max`; [`MIN_CHUNK`] until
    /// measured.
    fn budget(&self, max: usize) -> usize {
        let max = max.max(MIN_CHUNK);
        let n = match (self.decode_secs, self.prompt_token_secs) {
            (Some(d), Some(c)) if c > 0.0 => (Self::EXTRA * d / c).min(max as f64) as usize,
            (Some(_), Some(_)) => max,
            _ => MIN_CHUNK,
        };
        n.clamp(MIN_CHUNK, max)
    }
}

/// Prompt tokens to read now out of `left`, within `budget`: 0 (wait for the next step) or a chunk
/// of at least [`MIN_CHUNK`] that leaves 0 or at least [`MIN_CHUNK`] tokens, so that every token of
/// the prompt is computed by the same kernels as when the prompt is read whole (a prompt shorter
/// than [`MIN_CHUNK`] is read whole). May exceed `budget` by less than [`MIN_CHUNK`] rather than
/// leave a short tail.
fn prompt_chunk(left: usize, budget: usize) -> usize {
    if left <= budget {
        return left;
    }
    if budget < MIN_CHUNK {
        return 0;
    }
    if left - budget >= MIN_CHUNK {
        budget
    } else if left >= 2 * MIN_CHUNK {
        left - MIN_CHUNK
    } else {
        left
    }
}

/// Why a sequence leaves its slot.
enum Exit {
    Finished(FinishReason),
    /// The listener went away: nothing more to send.
    Gone,
    Failed(String),
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, cfg: SchedulerConfig, stats: Arc<SchedulerStats>) -> Scheduler<'m> {
        Self::build(model, cfg, stats, None)
    }

    /// A scheduler whose steps run on `backend` (the GPU's paged KV cache, one slot per sequence
    /// it was made for). Prompts are read in the backend's chunks, and a prompt shares the
    /// cached blocks of any earlier prompt with the same leading tokens, not only its slot's.
    pub fn paged(
        model: &'m Model,
        cfg: SchedulerConfig,
        stats: Arc<SchedulerStats>,
        backend: Box<dyn PagedBackend + 'm>,
    ) -> Scheduler<'m> {
        let s = Self::build(model, cfg, stats, Some(backend));
        s.publish_blocks();
        s
    }

    fn build(
        model: &'m Model,
        cfg: SchedulerConfig,
        stats: Arc<SchedulerStats>,
        paged: Option<Box<dyn PagedBackend + 'm>>,
    ) -> Scheduler<'m> {
        let cpu_ctx = if paged.is_some() { 0 } else { cfg.n_ctx };
        let slots = (0..cfg.n_slots.max(1))
            .map(|_| Slot {
                cache: {
                    // Resident from the start: the server's memory does not grow under load.
                    let mut c = KvCache::new(&model.weights.cfg, cpu_ctx);
                    c.commit();
                    c
                },
                tokens: Vec::new(),
                prompt_kernel_len: 0,
                kv_told: 0,
                feed: Vec::new(),
                last_used: 0,
                seq: None,
                draft: None,
            })
            .collect();
        Scheduler {
            model,
            paged,
            cfg,
            slots,
            waiting: VecDeque::new(),
            ws: Workspace::default(),
            step_no: 0,
            pace: Pace::default(),
            stats,
            kv_events: None,
        }
    }

    /// Gives every slot a draft model's state (its own KV cache, resident now), so that requests
    /// may speculate with `draft` ([`SpecMode::Draft`]); its vocabulary must be the model's
    /// ([`crate::speculative::check_vocabulary`]).
    pub fn with_draft(mut self, draft: &'m Model) -> anyhow::Result<Scheduler<'m>> {
        crate::speculative::check_vocabulary(self.model, draft)?;
        for slot in &mut self.slots {
            let mut d = DraftModel::new(draft, self.cfg.n_ctx)?;
            d.commit();
            slot.draft = Some(d);
        }
        Ok(self)
    }

    /// Sends the blocks the KV caches come to hold and stop holding to `sink`
    /// ([`crate::kv_events`]), after each admission and step that changed them; the first event
    /// is [`crate::kv_events::KvEvent::Cleared`].
    pub fn with_kv_events(mut self, sink: Box<dyn KvEventSink>) -> Scheduler<'m> {
        self.kv_events = Some((BlockTracker::new(self.slots.len()), sink));
        self.tell_kv_events();
        self
    }

    fn tell_kv_events(&mut self) {
        let Some((tracker, sink)) = self.kv_events.as_mut() else { return };
        let mut events = tracker.take_events();
        match self.paged.as_mut() {
            Some(p) => events.extend(p.take_kv_events()),
            None => {
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    tracker.sync(i, &slot.tokens, slot.kv_told);
                    slot.kv_told = slot.tokens.len();
                }
                events.extend(tracker.take_events());
            }
        }
        if !events.is_empty() {
            sink.publish(events);
        }
    }

    /// The paged KV cache's blocks (`None` on the CPU).
    pub fn blocks(&self) -> Option<BlockUse> {
        self.paged.as_ref().map(|p| p.blocks())
    }

    fn publish_blocks(&self) {
        if let Some(b) = self.blocks() {
            self.stats.kv_blocks_used.store(b.used, Ordering::Relaxed);
            self.stats.kv_blocks_cached.store(b.cached, Ordering::Relaxed);
            self.stats.kv_blocks_total.store(b.total, Ordering::Relaxed);
        }
    }

    pub fn n_active(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(|s| s.seq.is_none())
    }

    /// Takes requests from `rx` into free slots and steps until `rx` is closed and every slot is
    /// idle, or until `cancel` is set (then running and queued requests end as cancelled). A panic
    /// inside ends it too: every request held fails with an error event and
    /// [`SchedulerStats::failure`] tells why.
    pub fn run(&mut self, rx: &Receiver<Request>, cancel: &AtomicBool) {
        // Unwind safety: after a panic nothing of the scheduler is used but its requests' sinks,
        // to tell each that it failed.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve(rx, cancel))) {
            let reason = panic_message(panic.as_ref());
            self.fail_all(rx, &reason);
        }
    }

    fn serve(&mut self, rx: &Receiver<Request>, cancel: &AtomicBool) {
        let mut open = true;
        loop {
            if cancel.load(Ordering::SeqCst) {
                self.cancel_all();
                for mut r in self.waiting.drain(..).chain(rx.try_iter()) {
                    if !r.place.is_gone() {
                        r.sink.send(Event::Error("the server is shutting down".into()));
                    }
                }
                return;
            }
            if open && self.n_active() == 0 && self.waiting.is_empty() {
                // Idle: wait, but wake up now and then to see the cancel flag.
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => self.waiting.push_back(r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            // A waiting request whose client went away leaves now (dropping it gives back its
            // place), not when a slot frees up.
            self.waiting.retain(|r| !r.place.is_gone() && !r.sink.is_closed());
            // With `--mmap` the weights are the file's pages: a file changed since it was opened
            // can no longer be trusted (a truncation would end the process with SIGBUS). Stop
            // loudly instead of serving garbage; without `--mmap` the check always passes.
            if !self.waiting.is_empty() {
                if let Err(e) = self.model.check_file_unchanged() {
                    self.fail_all(rx, &format!("{e:#}"));
                    return;
                }
            }
            while self.has_free_slot() {
                let Some(r) = self.waiting.pop_front() else { break };
                if let Err(r) = self.admit(r) {
                    self.waiting.push_front(*r);
                    break;
                }
            }
            if self.n_active() == 0 {
                if !open && self.waiting.is_empty() {
                    return;
                }
                continue;
            }
            self.step();
        }
    }

    /// After a panic: records why, and fails every request held (running, waiting, sent).
    fn fail_all(&mut self, rx: &Receiver<Request>, reason: &str) {
        let _ = self.stats.failure.set(reason.to_string());
        let msg = format!("the scheduler failed: {reason}");
        let running: Vec<Request> = self.slots.iter_mut().filter_map(|s| s.seq.take()).map(|s| s.req).collect();
        self.stats.active.store(0, Ordering::SeqCst);
        for mut r in running.into_iter().chain(self.waiting.drain(..)).chain(rx.try_iter()) {
            let ev = Event::Error(msg.clone());
            // A sink that panics (perhaps the cause) must not keep the others from their error.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || r.sink.send(ev)));
        }
    }

    /// How many of `prompt`'s leading tokens `slot`'s cache can give with the prompt's logits
    /// bit-identical to a fresh computation (a request alone on a new slot, or `kiln run`). A fresh
    /// prompt of at least [`MIN_CHUNK`] tokens is read by the prompt kernels (in chunks of at
    /// least [`MIN_CHUNK`]); a shorter one by the generation kernels, whose results do not depend
    /// on the chunking. The two round differently, so a cached position is reused only if it was
    /// computed by the kernels a fresh computation would use, and the part left to read must be
    /// long enough to take them too. Generated tokens (generation kernels) are therefore reused
    /// only by prompts too short for the prompt kernels. At least one token is always read, to
    /// produce logits.
    fn reusable(&self, slot: &Slot<'_>, prompt: &[u32]) -> usize {
        let common = common_prefix(&slot.tokens, prompt).min(prompt.len().saturating_sub(1));
        if self.cfg.precision == Precision::Exact {
            // One path for every chunk size: anything cached is exact.
            return common;
        }
        if kiln_quant::matmul::uses_gemm(prompt.len()) {
            common.min(slot.prompt_kernel_len).min(prompt.len() - MIN_CHUNK)
        } else if slot.prompt_kernel_len == 0 {
            common
        } else {
            // Leading positions came from the prompt kernels: a short prompt reads them anew.
            0
        }
    }

    /// Puts `req` into the free slot sharing the longest prefix with its prompt. Returns the
    /// request back when no slot is free.
    pub fn admit(&mut self, mut req: Request) -> Result<(), Box<Request>> {
        let n_ctx = self.cfg.n_ctx;
        if req.sink.is_closed() || req.place.is_gone() {
            return Ok(());
        }
        if req.prompt.is_empty() {
            req.sink.send(Event::Error("the prompt is empty: nothing to generate from".into()));
            return Ok(());
        }
        if req.prompt.len() >= n_ctx {
            req.sink.send(Event::Error(format!(
                "the prompt has {} tokens but the context holds {n_ctx}: no room to generate",
                req.prompt.len()
            )));
            return Ok(());
        }
        let n_vocab = self.model.weights.cfg.n_vocab;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= n_vocab) {
            req.sink.send(Event::Error(format!("token id {t} is out of range (the vocabulary has {n_vocab} tokens)")));
            return Ok(());
        }
        if let Err(e) = req.params.validate() {
            req.sink.send(Event::Error(e));
            return Ok(());
        }
        if req.spec.mode == SpecMode::Draft && self.slots.iter().all(|s| s.draft.is_none()) {
            req.sink.send(Event::Error("speculation with a draft model needs one (serve --model-draft FILE)".into()));
            return Ok(());
        }
        if let Err(e) = req.spec.validate() {
            req.sink.send(Event::Error(e));
            return Ok(());
        }
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .map(|(i, s)| {
                let keep = if self.paged.is_some() { 0 } else { self.reusable(s, &req.prompt) };
                // A slot is taken for its cache when the prompt shares a whole block with it (the
                // same conversation, even where the kernels' rules reuse less) or all it holds; a
                // few shared leading tokens (a chat template's first words) are not worth
                // overwriting another conversation's cached prefix while a slot is empty.
                let shared = common_prefix(&s.tokens, &req.prompt);
                let worth = keep > 0 && (shared >= MIN_REUSE || keep == s.tokens.len());
                let tier = if worth {
                    2
                } else if s.tokens.is_empty() {
                    1
                } else {
                    0
                };
                (tier, keep, std::cmp::Reverse(s.last_used), i)
            })
            .max();
        let Some((_, mut keep, _, i)) = best else { return Err(Box::new(req)) };
        if let Some(p) = self.paged.as_mut() {
            // Blocks for the whole sequence are reserved now, so a running request never runs
            // out; without them the request waits (in order) until others finish.
            let max_len = req.prompt.len().saturating_add(req.max_tokens).min(n_ctx);
            match p.admit(i, &req.prompt, max_len) {
                Ok(Some(k)) => keep = k,
                Ok(None) => return Err(Box::new(req)),
                Err(e) => {
                    req.sink.send(Event::Error(format!("{e:#}")));
                    return Ok(());
                }
            }
            self.slots[i].tokens = req.prompt[..keep].to_vec();
            self.publish_blocks();
        }
        if !req.place.start() {
            // The client left meanwhile.
            if let Some(p) = self.paged.as_mut() {
                p.release(i);
                self.slots[i].tokens.clear();
                self.publish_blocks();
            }
            return Ok(());
        }
        let slot = &mut self.slots[i];
        slot.cache.truncate(keep);
        slot.tokens.truncate(keep);
        slot.kv_told = slot.kv_told.min(keep);
        slot.prompt_kernel_len = slot.prompt_kernel_len.min(keep);
        slot.feed.clear();
        let mut sampler = Sampler::new(req.params.clone());
        for &t in &req.prompt {
            sampler.accept(t);
        }
        let prompt_tokens = req.prompt.len();
        let prompt_left = req.prompt[keep..].to_vec();
        if !req.sink.send(Event::Started { prompt_tokens, cached_tokens: keep }) {
            return Ok(());
        }
        self.stats.prompt_tokens_cached.fetch_add(keep as u64, Ordering::Relaxed);
        let constraint = req.constraint.take();
        let draft = if req.spec.mode == SpecMode::Draft { slot.draft.take() } else { None };
        // Checked above: the options are valid, and a draft model is there when asked for.
        let speculator = Speculator::new(req.spec, draft).ok().flatten();
        slot.seq = Some(Sequence {
            req,
            sampler,
            constraint,
            decoder: self.model.tokenizer.decoder(),
            prompt_left,
            cached_tokens: keep,
            generated: 0,
            pending: String::new(),
            logprobs: Vec::new(),
            tokens: Vec::new(),
            admitted: Instant::now(),
            first_token: None,
            speculator,
            drafts: Vec::new(),
        });
        self.stats.active.store(self.n_active(), Ordering::SeqCst);
        self.tell_kv_events();
        Ok(())
    }

    /// One batched forward step over every active slot, then sampling for those that produced
    /// logits. Returns how many slots are still active.
    pub fn step(&mut self) -> usize {
        let n = self.step_slots();
        self.tell_kv_events();
        n
    }

    fn step_slots(&mut self) -> usize {
        self.step_no += 1;
        if self.cfg.panic_at_step == Some(self.step_no) {
            panic!("fault injection: the scheduler panics at step {}", self.step_no);
        }
        // Drop the sequences nobody listens to before spending a step on them.
        for i in 0..self.slots.len() {
            if self.slots[i].seq.as_ref().is_some_and(|s| s.req.sink.is_closed()) {
                self.exit(i, Exit::Gone);
            }
        }
        // Choose what each slot feeds: a generating sequence its last token (already in `feed`),
        // a reading one the next chunk of its prompt within the step's budget. While others
        // generate, the budget is what keeps their gap between tokens short.
        let generating = self.slots.iter().any(|s| s.seq.as_ref().is_some_and(|q| q.prompt_left.is_empty()));
        let max = self.cfg.prefill_budget.max(MIN_CHUNK);
        let mut budget = if generating { self.pace.budget(max) } else { max };
        let mut produces = vec![false; self.slots.len()];
        let mut prompt_step = vec![false; self.slots.len()];
        let (mut prompt_fed, mut decode_fed) = (0, 0);
        let mut reading = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(seq) = slot.seq.as_mut() else { continue };
            if seq.prompt_left.is_empty() {
                seq.drafts.clear();
                if let (Some(sp), [next]) = (seq.speculator.as_mut(), &slot.feed[..]) {
                    // Drafts after the sampled token, verified with it in this step.
                    let mut history = Vec::with_capacity(slot.tokens.len() + 1);
                    history.extend_from_slice(&slot.tokens);
                    history.push(*next);
                    let room = (seq.req.max_tokens.saturating_sub(seq.generated + 1))
                        .min(self.cfg.n_ctx.saturating_sub(slot.tokens.len() + 1));
                    // A draft model that fails to draft (its context full) leaves the token to
                    // plain decoding; the model's own step reports real errors.
                    seq.drafts = sp.propose(&history, room).unwrap_or_default();
                    slot.feed.extend_from_slice(&seq.drafts);
                }
                produces[i] = !slot.feed.is_empty();
                decode_fed += slot.feed.len();
            } else {
                reading.push((seq.prompt_left.len(), i));
            }
        }
        // Shortest prompt first: a short prompt behind a long one gets its first token at once
        // instead of after the whole long prompt (the long one loses a step per short one).
        reading.sort_unstable();
        for (_, i) in reading {
            let slot = &mut self.slots[i];
            let Some(seq) = slot.seq.as_mut() else { continue };
            let n = match &self.paged {
                // The backend's chunks (bounds fixed by the prompt alone), as many as the budget
                // takes, at least one per step; short ones ride along in the generation pass.
                Some(p) => {
                    let n = p.prompt_chunk(i, seq.prompt_left.len());
                    if prompt_fed == 0 || budget > 0 || p.rides_along(n) {
                        n
                    } else {
                        0
                    }
                }
                None => prompt_chunk(seq.prompt_left.len(), budget),
            };
            if n == 0 {
                continue;
            }
            prompt_step[i] = true;
            budget = budget.saturating_sub(n);
            prompt_fed += n;
            slot.feed = seq.prompt_left.drain(..n).collect();
            produces[i] = seq.prompt_left.is_empty();
        }
        let t0 = Instant::now();
        let mut order = Vec::new();
        let result = {
            let mut steps = Vec::new();
            // Constraints of the sequences that sample after this step: their masks are computed
            // while the forward pass runs.
            let mut masks = Vec::new();
            for (i, slot) in self.slots.iter_mut().enumerate() {
                let Slot { cache, feed, seq, .. } = slot;
                let Some(seq) = seq.as_mut() else { continue };
                if feed.is_empty() {
                    continue;
                }
                order.push(i);
                let want = if seq.drafts.is_empty() { Logits::Last } else { Logits::All };
                steps.push(SeqStep { cache, tokens: feed, want });
                if let (true, Some(c)) = (produces[i], seq.constraint.as_mut()) {
                    masks.push(c);
                }
            }
            if steps.is_empty() {
                return self.n_active();
            }
            if !crate::constraint::overlap_masks() {
                // No core to spare: the masks first (a failure shows again when applied).
                for c in masks.drain(..) {
                    let _ = c.prepare();
                }
            }
            let (model, precision, ws) = (&self.model.weights, self.cfg.precision, &mut self.ws);
            let paged = self.paged.as_mut();
            std::thread::scope(|s| {
                let masking = (!masks.is_empty()).then(|| {
                    s.spawn(move || {
                        // A failure here shows again (and ends its request) when the mask is applied.
                        for c in masks {
                            let _ = c.prepare();
                        }
                    })
                });
                let r = match paged {
                    Some(p) => {
                        let paged_steps: Vec<PagedStep<'_>> = order
                            .iter()
                            .zip(&steps)
                            .map(|(&i, st)| PagedStep {
                                slot: i,
                                tokens: st.tokens,
                                want: st.want,
                                prompt: prompt_step[i],
                            })
                            .collect();
                        p.step(&paged_steps).map_err(|e| format!("{e:#}"))
                    }
                    None => forward_batch(model, &mut steps, precision, ws, None).map_err(|e| e.to_string()),
                };
                if let Some(h) = masking {
                    let _ = h.join();
                }
                r
            })
        };
        let took = t0.elapsed();
        self.pace.record(prompt_fed, decode_fed, took.as_secs_f64());
        // Each speculating sequence's share of the step, by its tokens: what its drafts cost.
        let fed_total = prompt_fed + decode_fed;
        for slot in self.slots.iter_mut() {
            let n = slot.feed.len();
            if let Some(sp) = slot.seq.as_mut().and_then(|q| q.speculator.as_mut()) {
                if n > 0 && fed_total > 0 {
                    sp.record_step(n, took.as_secs_f64() * n as f64 / fed_total as f64);
                }
            }
        }
        self.stats.busy_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let all_logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Nothing was modified; the inputs were checked at admission, so this is a bug
                // or a full context: fail the sequences of this step, keep serving the others.
                for &i in &order {
                    self.exit(i, Exit::Failed(format!("model error: {e}")));
                }
                return self.n_active();
            }
        };
        let mut sampled = Vec::new();
        for (&i, mut logits) in order.iter().zip(all_logits) {
            let slot = &mut self.slots[i];
            let fed = std::mem::take(&mut slot.feed);
            slot.last_used = self.step_no;
            if slot.seq.as_ref().is_some_and(|s| s.generated == 0) {
                self.stats.prompt_tokens_evaluated.fetch_add(fed.len() as u64, Ordering::Relaxed);
            }
            // Prompt kernels for a chunk this long; contiguous runs only (reuse is by prefix).
            if kiln_quant::matmul::uses_gemm(fed.len()) && slot.prompt_kernel_len == slot.tokens.len() {
                slot.prompt_kernel_len += fed.len();
            }
            slot.tokens.extend_from_slice(&fed);
            if produces[i] {
                sampled.push((i, std::mem::take(&mut logits)));
            }
        }
        // Sampling, decoding and stop strings, per sequence: in parallel when several sample
        // (each touches only its own slot; with many sequences the softmaxes and sorts over the
        // vocabulary cost as much as a GPU step).
        let (model, stats, n_ctx) = (self.model, &*self.stats, self.cfg.n_ctx);
        let mut work: Vec<(usize, &mut Slot<'m>, Vec<f32>)> = Vec::with_capacity(sampled.len());
        {
            let mut rows = sampled.into_iter().peekable();
            for (i, slot) in self.slots.iter_mut().enumerate() {
                if rows.peek().is_some_and(|(j, _)| *j == i) {
                    let (_, l) = rows.next().expect("peeked");
                    work.push((i, slot, l));
                }
            }
        }
        let advance = |(i, slot, mut logits): (usize, &mut Slot<'m>, Vec<f32>)| {
            let (exit, keep) = advance(slot, &mut logits, model, stats, n_ctx);
            (i, exit, keep)
        };
        let outcomes: Vec<(usize, Option<Exit>, Option<usize>)> = if work.len() >= PARALLEL_SAMPLING {
            use rayon::prelude::*;
            work.into_par_iter().map(advance).collect()
        } else {
            work.into_iter().map(advance).collect()
        };
        for (i, exit, keep) in outcomes {
            if let (Some(p), Some(keep)) = (self.paged.as_mut(), keep) {
                p.truncate(i, keep);
            }
            if let Some(exit) = exit {
                self.exit(i, exit);
            }
        }
        self.publish_blocks();
        self.n_active()
    }
}

/// Slots sampling in one step from which their sampling runs in parallel.
const PARALLEL_SAMPLING: usize = 4;

/// Samples `slot`'s tokens from `logits` — one row, or one per token fed when it verified drafts:
/// row by row while the drafted token is the one drawn — and hands out the text that became final.
/// The keys and values of rejected drafts leave the slot's cache; returns why the sequence ends
/// (if it does) and, when drafts were rejected, the positions its cache keeps (for a paged
/// backend's cache, which the caller truncates).
fn advance(
    slot: &mut Slot<'_>,
    logits: &mut [f32],
    model: &Model,
    stats: &SchedulerStats,
    n_ctx: usize,
) -> (Option<Exit>, Option<usize>) {
    let nv = model.weights.cfg.n_vocab;
    let Some(seq) = slot.seq.as_mut() else { return (None, None) };
    let drafts = std::mem::take(&mut seq.drafts);
    let fed = slot.tokens.len();
    let mut accepted = 0;
    let mut exit = None;
    for (row, logits) in logits.chunks_exact_mut(nv).enumerate() {
        let draft = drafts.get(row).copied();
        // Tokens in the cache up to this row's: the drafts after it are not (yet) accepted.
        let in_cache = fed - (drafts.len() - row);
        match advance_one(slot, logits, in_cache, model, stats, n_ctx) {
            Ok(next) if draft == Some(next) => accepted += 1,
            Ok(_) => break,
            Err(e) => {
                exit = Some(e);
                break;
            }
        }
    }
    if !drafts.is_empty() {
        stats.spec_verifications.fetch_add(1, Ordering::Relaxed);
        stats.spec_drafted.fetch_add(drafts.len() as u64, Ordering::Relaxed);
        stats.spec_accepted.fetch_add(accepted as u64, Ordering::Relaxed);
    }
    if let Some(sp) = slot.seq.as_mut().and_then(|q| q.speculator.as_mut()) {
        sp.record_verification(drafts.len(), accepted);
    }
    let mut kept = None;
    if exit.is_none() {
        // The rejected drafts' keys and values go (a finished sequence keeps them: they are
        // right for the tokens they follow, and the slot's tokens say which those are).
        let keep = fed - drafts.len() + accepted;
        slot.cache.truncate(keep);
        slot.tokens.truncate(keep);
        slot.kv_told = slot.kv_told.min(keep);
        kept = (keep < fed).then_some(keep);
    }
    (exit, kept)
}

/// Samples one token of `slot` from `logits` with `in_cache` tokens before it in the cache, and
/// hands out the text that became final. Returns the token, or why the sequence ends.
fn advance_one(
    slot: &mut Slot<'_>,
    logits: &mut [f32],
    in_cache: usize,
    model: &Model,
    stats: &SchedulerStats,
    n_ctx: usize,
) -> Result<u32, Exit> {
    let tok = &model.tokenizer;
    let Some(seq) = slot.seq.as_mut() else { return Err(Exit::Gone) };
    let lp = seq.req.logprobs.map(|k| token_logprobs(logits, k));
    if let Some(c) = seq.constraint.as_mut() {
        if let Err(e) = c.apply(logits) {
            return Err(Exit::Failed(e.to_string()));
        }
    }
    // The token plain decoding draws here (same logits, same random number): a drafted token
    // is accepted when it is this one.
    let next = seq.sampler.sample(logits);
    seq.sampler.accept(next);
    seq.first_token.get_or_insert_with(Instant::now);
    // Under a constraint an end-of-generation token is drawn only where the output may end.
    if (seq.req.stop_at_eog || seq.constraint.is_some()) && tok.is_eog(next) {
        return Err(Exit::Finished(FinishReason::Stop));
    }
    if let Some(c) = seq.constraint.as_mut() {
        if let Err(e) = c.accept(next) {
            return Err(Exit::Failed(e.to_string()));
        }
    }
    seq.generated += 1;
    seq.tokens.push(next);
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let text = match seq.decoder.push(next) {
        Ok(text) => text,
        Err(e) => return Err(Exit::Failed(format!("decoding token {next}: {e}"))),
    };
    if let Some((logprob, top)) = lp {
        let piece = |t: u32| tok.token_to_piece(t).unwrap_or_default();
        let top = top.into_iter().map(|(t, l)| (t, piece(t), l)).collect();
        let (bytes, logprob) = (piece(next), logprob[next as usize]);
        seq.logprobs.push(TokenLogprob { token: next, bytes, text: text.clone(), logprob, top });
    }
    seq.pending.push_str(&text);
    if let Some(cut) = find_stop(&seq.pending, &seq.req.stop) {
        seq.pending.truncate(cut);
        if !flush(seq, cut) {
            return Err(Exit::Gone);
        }
        return Err(Exit::Finished(FinishReason::Stop));
    }
    let safe = seq.pending.len() - held_back(&seq.pending, &seq.req.stop);
    if (safe > 0 || seq.req.token_deltas) && !flush(seq, safe) {
        return Err(Exit::Gone);
    }
    if seq.constraint.as_ref().is_some_and(Constraint::is_complete) {
        return Err(Exit::Finished(FinishReason::Stop));
    }
    if seq.generated >= seq.req.max_tokens || in_cache + 1 > n_ctx {
        return Err(Exit::Finished(FinishReason::Length));
    }
    slot.feed.clear();
    slot.feed.push(next);
    Ok(next)
}

impl<'m> Scheduler<'m> {
    /// Ends the sequence in slot `i`; the slot keeps its cache and tokens for prefix reuse.
    fn exit(&mut self, i: usize, why: Exit) {
        let slot = &mut self.slots[i];
        slot.feed.clear();
        let Some(mut seq) = slot.seq.take() else { return };
        if let Some(d) = seq.speculator.take().and_then(Speculator::into_draft) {
            slot.draft = Some(d);
        }
        if let Some(p) = self.paged.as_mut() {
            // The blocks go back now (a client gone, a request done): registered prompt blocks
            // stay cached for later prompts, the rest are free.
            p.release(i);
            slot.tokens.clear();
            self.publish_blocks();
        }
        match why {
            Exit::Gone => {}
            Exit::Failed(msg) => {
                // The cache may be half-written for this sequence: forget it.
                let slot = &mut self.slots[i];
                slot.cache.clear();
                slot.tokens.clear();
                slot.kv_told = 0;
                slot.prompt_kernel_len = 0;
                seq.req.sink.send(Event::Error(msg));
            }
            Exit::Finished(reason) => {
                if reason == FinishReason::Cancelled {
                    seq.pending.clear();
                } else {
                    // Text held back for a stop string that never came, and bytes of an
                    // unfinished character, are part of the output after all.
                    let rest = seq.decoder.finish();
                    seq.pending.push_str(&rest);
                }
                let n = seq.pending.len();
                if (n > 0 || !seq.tokens.is_empty()) && !flush(&mut seq, n) {
                    self.stats.active.store(self.n_active(), Ordering::SeqCst);
                    return;
                }
                let now = Instant::now();
                let since = |t: Instant| t.duration_since(seq.req.submitted).as_secs_f64();
                let fin = Finish {
                    reason,
                    prompt_tokens: seq.req.prompt.len(),
                    cached_tokens: seq.cached_tokens,
                    completion_tokens: seq.generated,
                    queue_seconds: since(seq.admitted),
                    first_token_seconds: since(seq.first_token.unwrap_or(now)),
                    total_seconds: since(now),
                };
                seq.req.sink.send(Event::Done(fin));
            }
        }
        self.stats.active.store(self.n_active(), Ordering::SeqCst);
    }

    fn cancel_all(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].seq.is_some() {
                self.exit(i, Exit::Finished(FinishReason::Cancelled));
            }
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

/// Sends `seq.pending[..upto]` (and the log-probabilities gathered so far) and removes it from
/// `pending`. Returns `false` when the listener is gone.
fn flush(seq: &mut Sequence<'_>, upto: usize) -> bool {
    let text: String = seq.pending.drain(..upto).collect();
    let logprobs = std::mem::take(&mut seq.logprobs);
    let tokens = std::mem::take(&mut seq.tokens);
    seq.req.sink.send(Event::Delta { text, tokens, logprobs })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Log-softmax of `logits` (summed in f64) and the `k` most likely tokens, most likely first
/// (ties by lower id).
fn token_logprobs(logits: &[f32], k: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp: Vec<f32> = logits.iter().map(|&l| (l as f64 - lse) as f32).collect();
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
    }
    idx.truncate(k);
    idx.sort_unstable_by(by);
    let top = idx.iter().map(|&t| (t, lp[t as usize])).collect();
    (lp, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::sync::Mutex;

    #[test]
    fn stop_helpers_and_prefix() {
        let stops = vec!["\n\n".to_string(), "User:".to_string()];
        assert_eq!(find_stop("abc\n\nd", &stops), Some(3));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(held_back("hello Us", &stops), 2);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }

    type Log = Arc<Mutex<Vec<Event>>>;

    struct Collect(Log);

    impl EventSink for Collect {
        fn send(&mut self, event: Event) -> bool {
            self.0.lock().unwrap().push(event);
            true
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    /// A sink that records when the scheduler drops it.
    struct Watched(Arc<AtomicBool>);

    impl EventSink for Watched {
        fn send(&mut self, _: Event) -> bool {
            true
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A sink whose listener breaks: it panics on the first generated text.
    struct Explodes;

    impl EventSink for Explodes {
        fn send(&mut self, event: Event) -> bool {
            if let Event::Delta { .. } = event {
                panic!("the sink exploded");
            }
            true
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    fn synth(name: &str) -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../../shared/models/synth/synth-tiny-{name}.gguf"));
        Model::load(&path).expect("synth model")
    }

    fn config(n_slots: usize, prefill_budget: usize) -> SchedulerConfig {
        SchedulerConfig { n_slots, n_ctx: 256, precision: Precision::Fast, prefill_budget, panic_at_step: None }
    }

    /// A greedy request whose events go to a log; it holds a place of `stats`.
    fn request(stats: &Arc<SchedulerStats>, prompt: &[u32], max_tokens: usize, sink: Box<dyn EventSink>) -> Request {
        Request {
            prompt: prompt.to_vec(),
            params: SamplingParams::greedy(),
            max_tokens,
            stop: vec![],
            stop_at_eog: false,
            logprobs: Some(0),
            constraint: None,
            spec: SpecOptions::off(),
            token_deltas: false,
            sink,
            submitted: Instant::now(),
            place: stats.try_enter(usize::MAX).expect("a place"),
        }
    }

    fn logged(stats: &Arc<SchedulerStats>, prompt: &[u32], max_tokens: usize) -> (Request, Log) {
        let log = Log::default();
        (request(stats, prompt, max_tokens, Box::new(Collect(log.clone()))), log)
    }

    fn text(log: &Log) -> String {
        let ev = log.lock().unwrap();
        ev.iter().filter_map(|e| if let Event::Delta { text, .. } = e { Some(text.as_str()) } else { None }).collect()
    }

    /// The bits of every generated token's log-probability.
    fn logprob_bits(log: &Log) -> Vec<(u32, u32)> {
        let ev = log.lock().unwrap();
        ev.iter()
            .filter_map(|e| if let Event::Delta { logprobs, .. } = e { Some(logprobs) } else { None })
            .flatten()
            .map(|t| (t.token, t.logprob.to_bits()))
            .collect()
    }

    /// Prompts read in chunks alongside other sequences' decoding, and a second round that reuses
    /// the slots' cached prefixes, give exactly the greedy text of a lone Session.
    #[test]
    fn chunked_prefill_and_prefix_reuse_match_session() {
        let model = synth("Q4_K");
        let stats = Arc::new(SchedulerStats::default());
        let mut sched = Scheduler::new(&model, config(3, 5), stats.clone());
        let texts = [
            "The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the yard twice",
            "a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P",
            "Once upon a time, far away",
        ];
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenizer.encode(t, true, false).unwrap()).collect();
        // Longer than one chunk: read in pieces.
        assert!(prompts[0].len() > 2 * MIN_CHUNK && prompts[1].len() > 2 * MIN_CHUNK, "{prompts:?}");
        let want: Vec<String> = prompts
            .iter()
            .map(|p| {
                let mut s = crate::Session::new(&model, 256, Precision::Fast);
                let opts = crate::GenerateOptions { max_tokens: 20, stop: vec![], stop_at_eog: false };
                s.generate(p, &opts, &mut Sampler::new(SamplingParams::greedy()), |_| true).unwrap().text
            })
            .collect();
        for round in 0..2 {
            let logs: Vec<Log> = prompts
                .iter()
                .map(|p| {
                    let (req, log) = logged(&stats, p, 20);
                    assert!(sched.admit(req).is_ok());
                    log
                })
                .collect();
            while sched.step() > 0 {}
            for (i, log) in logs.iter().enumerate() {
                assert_eq!(text(log), want[i], "round {round}, prompt {i}");
                let ev = log.lock().unwrap();
                let Some(Event::Done(f)) = ev.last() else { panic!("no Done: {ev:?}") };
                assert_eq!((f.reason, f.completion_tokens), (FinishReason::Length, 20));
                // Round 2 finds each prompt in the slot it used before: all but the last
                // MIN_CHUNK tokens of a prompt read by the prompt kernels, all but the last token
                // of a shorter one.
                let n = prompts[i].len();
                let cached = if n >= MIN_CHUNK { n - MIN_CHUNK } else { n - 1 };
                assert_eq!(f.cached_tokens, if round == 0 { 0 } else { cached }, "round {round}");
            }
        }
        // Every request gave its place back.
        assert_eq!(stats.in_system.load(Ordering::SeqCst), 0);
        assert_eq!(stats.queued.load(Ordering::SeqCst), 0);
    }

    /// Speculative decoding in the scheduler changes no result: four greedy requests decoded
    /// together, drafting by prompt lookup (repetitive prompts, so drafts are proposed and
    /// verified beside other sequences' single tokens and prompt chunks), give the tokens and
    /// log-probability bits of the same requests without speculation; the counters show that
    /// drafts were verified (how many are accepted, and the rows after an accepted one, are
    /// covered on every fixture model in the parity tests).
    #[test]
    fn speculation_under_concurrency_changes_no_result() {
        let model = synth("Q8_0");
        let texts = [
            "one two three four one two three four one two three four one two three",
            "a b c a b c a b c a b c a b c a b c a b c a b c",
            "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
            "Once upon a time, far away",
        ];
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenizer.encode(t, true, false).unwrap()).collect();
        let run = |spec: SpecOptions| {
            let stats = Arc::new(SchedulerStats::default());
            let mut sched = Scheduler::new(&model, config(4, 16), stats.clone());
            let logs: Vec<Log> = prompts
                .iter()
                .map(|p| {
                    let (mut req, log) = logged(&stats, p, 48);
                    req.spec = spec;
                    assert!(sched.admit(req).is_ok());
                    log
                })
                .collect();
            while sched.step() > 0 {}
            let out: Vec<_> = logs.iter().map(|l| (text(l), logprob_bits(l))).collect();
            (out, stats)
        };
        let (plain, _) = run(SpecOptions::off());
        let (spec, stats) = run(SpecOptions { mode: SpecMode::Ngram, draft_max: 14 });
        for (i, (a, b)) in plain.iter().zip(&spec).enumerate() {
            assert_eq!(a.1.len(), 48, "request {i}");
            assert_eq!(a, b, "request {i}: speculation changed the output");
        }
        let (drafted, accepted) =
            (stats.spec_drafted.load(Ordering::SeqCst), stats.spec_accepted.load(Ordering::SeqCst));
        let verifications = stats.spec_verifications.load(Ordering::SeqCst);
        assert!(verifications > 0 && drafted >= accepted, "{verifications}: drafted {drafted}, accepted {accepted}");
    }

    /// Prefix-cache reuse never changes a result: the same prompt again, and the next turn of a
    /// conversation (the previous prompt, its answer and more), give the log-probabilities, bit
    /// for bit, of the same prompt on a fresh scheduler — whether the prompt is long enough for
    /// the prompt kernels or not.
    #[test]
    fn prefix_reuse_gives_the_bits_of_a_fresh_computation() {
        let model = synth("Q4_K");
        let stats = Arc::new(SchedulerStats::default());
        let run = |sched: &mut Scheduler<'_>, prompt: &[u32]| {
            let (req, log) = logged(&stats, prompt, 12);
            assert!(sched.admit(req).is_ok());
            while sched.step() > 0 {}
            let ev = log.lock().unwrap();
            let Some(Event::Done(f)) = ev.last() else { panic!("no Done: {ev:?}") };
            let (cached, tokens) = (f.cached_tokens, f.completion_tokens);
            drop(ev);
            (logprob_bits(&log), cached, tokens)
        };
        for len in [6usize, 40] {
            let first: Vec<u32> = (0..len as u32).map(|i| (i * 37 + 5) % 1000).collect();
            let mut warm = Scheduler::new(&model, config(1, 64), stats.clone());
            let (lp1, _, _) = run(&mut warm, &first);
            // The same prompt again, from the cache.
            let (again, cached, _) = run(&mut warm, &first);
            assert_eq!(again, lp1, "len {len}: the same prompt from the cache");
            assert!(cached > 0, "len {len}: nothing was reused");
            // The next turn: the previous prompt, its answer, and a few more tokens.
            let mut next = first.clone();
            next.extend(lp1.iter().map(|t| t.0));
            next.extend([17, 99, 311]);
            let (turn2, _, _) = run(&mut warm, &next);
            let mut fresh = Scheduler::new(&model, config(1, 64), stats.clone());
            let (want, cached, _) = run(&mut fresh, &next);
            assert_eq!(cached, 0);
            assert_eq!(turn2, want, "len {len}: the next turn from the cache");
        }
    }

    /// A long prompt read 16 tokens a step beside a generating sequence gives both sequences the
    /// log-probabilities, bit for bit, that they get alone with the prompt read in one step.
    #[test]
    fn chunked_prompt_gives_the_bits_of_a_whole_prompt() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let short: Vec<u32> = (0..5).map(|i| (i * 13 + 3) % 1000).collect();
        let long: Vec<u32> = (0..101).map(|i| (i * 37 + 5) % 1000).collect();
        let alone = |prompt: &[u32], n: usize| {
            let mut sched = Scheduler::new(&model, config(1, 512), stats.clone());
            let (req, log) = logged(&stats, prompt, n);
            assert!(sched.admit(req).is_ok());
            while sched.step() > 0 {}
            logprob_bits(&log)
        };
        let (want_short, want_long) = (alone(&short, 60), alone(&long, 10));
        let mut sched = Scheduler::new(&model, config(2, MIN_CHUNK), stats.clone());
        let (a, log_a) = logged(&stats, &short, 60);
        assert!(sched.admit(a).is_ok());
        for _ in 0..3 {
            sched.step();
        }
        let (b, log_b) = logged(&stats, &long, 10);
        assert!(sched.admit(b).is_ok());
        let mut steps_to_first = 0;
        while logprob_bits(&log_b).is_empty() {
            sched.step();
            steps_to_first += 1;
        }
        // 101 tokens by at most 16 a step, no piece under 16: 16 × 5 + 21.
        assert_eq!(steps_to_first, 6);
        while sched.step() > 0 {}
        assert_eq!(logprob_bits(&log_a), want_short, "the generating sequence");
        assert_eq!(logprob_bits(&log_b), want_long, "the chunked prompt");
    }

    /// Shortest prompt first: a short prompt admitted after a long one gets its first token from
    /// the first step.
    #[test]
    fn a_short_prompt_is_not_held_behind_a_long_one() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let mut sched = Scheduler::new(&model, config(2, MIN_CHUNK), stats.clone());
        let long: Vec<u32> = (0..100).map(|i| (i * 37 + 5) % 1000).collect();
        let (a, log_long) = logged(&stats, &long, 4);
        let (b, log_short) = logged(&stats, &[1, 2, 3, 4, 5], 4);
        assert!(sched.admit(a).is_ok() && sched.admit(b).is_ok());
        sched.step();
        assert_eq!((logprob_bits(&log_short).len(), logprob_bits(&log_long).len()), (1, 0));
        while sched.step() > 0 {}
        assert_eq!(logprob_bits(&log_long).len(), 4);
    }

    #[test]
    fn prompt_chunks_never_leave_a_short_tail() {
        let m = MIN_CHUNK;
        assert_eq!(prompt_chunk(5, 100), 5);
        assert_eq!(prompt_chunk(5, 3), 0);
        assert_eq!(prompt_chunk(100, m - 1), 0);
        assert_eq!(prompt_chunk(100, 40), 40);
        // 100 - 90 would leave 10: leave MIN_CHUNK instead.
        assert_eq!(prompt_chunk(100, 90), 100 - m);
        // Too short to split in two chunks: all of it, a little over budget.
        assert_eq!(prompt_chunk(m + 3, m), m + 3);
        for left in 1..200 {
            for budget in 0..120 {
                let n = prompt_chunk(left, budget);
                assert!(n <= left);
                if n > 0 && n < left {
                    assert!(n >= m && left - n >= m && n <= budget, "left {left} budget {budget}: {n}");
                }
                if n == left && left > budget {
                    assert!(left < budget + m && budget >= m, "left {left} budget {budget}");
                }
            }
        }
    }

    #[test]
    fn pace_sizes_the_prompt_work_by_the_decode_step() {
        let mut p = Pace::default();
        assert_eq!(p.budget(256), MIN_CHUNK, "unmeasured");
        p.record(0, 4, 0.010);
        p.record(64, 0, 0.064);
        // 10 ms a decode step, 1 ms a prompt token (read alone): 20 ms of prompt work, 20 tokens.
        assert_eq!(p.budget(256), 20);
        let mut p = Pace::default();
        p.record(0, 4, 0.010);
        p.record(100, 4, 0.010 + 100.0 * 0.0002);
        // 0.2 ms a token beside the decoding: 100 tokens in twice a decode step's time.
        assert_eq!(p.budget(256), 100);
        assert_eq!(p.budget(30), 30);
        p.record(0, 4, 0.5);
        assert!(p.budget(256) > 100, "slower decode steps leave room for more prompt");
        // Prompt tokens so dear that the minimum chunk takes longer: the minimum all the same.
        let mut p = Pace::default();
        p.record(0, 1, 0.010);
        p.record(16, 1, 0.010 + 16.0 * 0.005);
        assert_eq!(p.budget(256), MIN_CHUNK);
    }

    #[test]
    fn places_count_waiting_and_running_requests() {
        let stats = Arc::new(SchedulerStats::default());
        let counts = || (stats.in_system.load(Ordering::SeqCst), stats.queued.load(Ordering::SeqCst));
        let a = stats.try_enter(2).unwrap();
        let b = stats.try_enter(2).unwrap();
        assert!(stats.try_enter(2).is_none(), "full");
        assert_eq!(counts(), (2, 2));
        assert!(a.start());
        assert_eq!(counts(), (2, 1));
        // The client's handle goes first: the place is free at once, and the request cannot start.
        let client = b.share();
        drop(client);
        assert!(b.is_gone() && !b.start());
        assert_eq!(counts(), (1, 0));
        drop(b);
        assert_eq!(counts(), (1, 0));
        let c = stats.try_enter(2).unwrap();
        assert_eq!(counts(), (2, 1));
        drop(a);
        drop(c);
        assert_eq!(counts(), (0, 0));
    }

    /// A waiting request whose client goes away leaves the wait list while the slot stays busy.
    #[test]
    fn a_waiting_client_that_leaves_frees_its_place_and_never_runs() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let (tx, rx) = channel();
        let cancel = AtomicBool::new(false);
        let (busy, busy_log) = logged(&stats, &[1, 2, 3], 250);
        let dropped = Arc::new(AtomicBool::new(false));
        let waiter = request(&stats, &[4, 5, 6], 5, Box::new(Watched(dropped.clone())));
        let client = waiter.place.share();
        tx.send(busy).unwrap();
        tx.send(waiter).unwrap();
        std::thread::scope(|s| {
            let (model, cancel, sched_stats) = (&model, &cancel, stats.clone());
            s.spawn(move || Scheduler::new(model, config(1, 256), sched_stats).run(&rx, cancel));
            let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
                let t0 = Instant::now();
                while !cond() {
                    assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            wait_for("the first request to start", &|| !busy_log.lock().unwrap().is_empty());
            assert_eq!(stats.queued.load(Ordering::SeqCst), 1);
            drop(client);
            // Its place is free at once; the scheduler drops the request at its next step.
            assert_eq!((stats.in_system.load(Ordering::SeqCst), stats.queued.load(Ordering::SeqCst)), (1, 0));
            wait_for("the waiting request to be dropped", &|| dropped.load(Ordering::SeqCst));
            let ev = busy_log.lock().unwrap();
            assert!(!matches!(ev.last(), Some(Event::Done(_))), "dropped only when the slot freed up");
            drop(ev);
            cancel.store(true, Ordering::SeqCst);
        });
        assert!(matches!(busy_log.lock().unwrap().last(), Some(Event::Done(f)) if f.reason == FinishReason::Cancelled));
        assert_eq!(stats.in_system.load(Ordering::SeqCst), 0);
    }

    /// A panic inside the scheduler fails every request it holds (running, waiting, still in the
    /// channel) with an error event, marks it failed with the reason, and ends `run`.
    #[test]
    fn a_panic_fails_every_request_and_marks_the_scheduler_dead() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let (tx, rx) = channel();
        let (running, running_log) = logged(&stats, &[1, 2, 3], 100);
        let breaks = request(&stats, &[7, 8, 9], 100, Box::new(Explodes));
        let (waiting, waiting_log) = logged(&stats, &[4, 5, 6], 100);
        for r in [running, breaks, waiting] {
            tx.send(r).unwrap();
        }
        // The sender stays open: only the panic can end `run`.
        Scheduler::new(&model, config(2, 256), stats.clone()).run(&rx, &AtomicBool::new(false));
        let reason = stats.failure().expect("marked failed");
        assert!(reason.contains("the sink exploded"), "{reason}");
        for (name, log) in [("running", &running_log), ("waiting", &waiting_log)] {
            let ev = log.lock().unwrap();
            match ev.last() {
                Some(Event::Error(e)) => assert!(e.contains("scheduler failed") && e.contains("exploded"), "{e}"),
                other => panic!("{name}: last event {other:?}"),
            }
        }
        assert_eq!(stats.active.load(Ordering::SeqCst), 0);
        assert_eq!((stats.in_system.load(Ordering::SeqCst), stats.queued.load(Ordering::SeqCst)), (0, 0));
        // New requests are refused.
        assert!(stats.try_enter(10).is_none());
        drop(tx);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let (lp, top) = token_logprobs(&[1.0, 3.0, 2.0, 3.0], 3);
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((lp[1] - lp[2] - 1.0).abs() < 1e-6);
    }

    struct KvLog(Arc<Mutex<Vec<crate::kv_events::KvEvent>>>);

    impl KvEventSink for KvLog {
        fn publish(&mut self, events: Vec<crate::kv_events::KvEvent>) {
            self.0.lock().unwrap().extend(events);
        }
    }

    /// The KV events, replayed in order, give exactly the full blocks the slots' caches hold:
    /// every id stored once while held, removed only while held, shared prefixes told once.
    #[test]
    fn kv_events_tell_exactly_the_blocks_the_slots_hold() {
        use crate::kv_events::{block_id, KvEvent, KV_EVENT_BLOCK};
        use std::collections::HashSet;
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut sched =
            Scheduler::new(&model, config(2, 64), stats.clone()).with_kv_events(Box::new(KvLog(log.clone())));
        let base: Vec<u32> = (0..40).map(|i| 100 + i * 3).collect();
        let other: Vec<u32> = (0..50).map(|i| 900 + i).collect();
        let mut branch = base[..33].to_vec();
        branch.extend([7, 8, 9, 10, 11, 12]);
        let mut replay: HashSet<u64> = HashSet::new();
        let mut stored_ever = 0;
        for (round, prompts) in
            [vec![&base, &branch], vec![&other], vec![&base, &other], vec![&branch]].iter().enumerate()
        {
            for p in prompts {
                let (req, _) = logged(&stats, p, 12);
                assert!(sched.admit(req).is_ok());
            }
            while sched.step() > 0 {}
            for e in log.lock().unwrap().drain(..) {
                match e {
                    KvEvent::Cleared => replay.clear(),
                    KvEvent::Stored { parent, blocks } => {
                        let mut parent = parent;
                        if let Some(p) = parent {
                            assert!(replay.contains(&p), "round {round}: parent {p} is not held");
                        }
                        for b in blocks {
                            assert_eq!(b.tokens.len(), KV_EVENT_BLOCK);
                            assert_eq!(b.id, block_id(parent, &b.tokens), "round {round}: ids chain");
                            assert!(replay.insert(b.id), "round {round}: {} stored twice", b.id);
                            stored_ever += 1;
                            parent = Some(b.id);
                        }
                    }
                    KvEvent::Removed { ids } => {
                        for id in ids {
                            assert!(replay.remove(&id), "round {round}: {id} removed but not held");
                        }
                    }
                }
            }
            let mut want = HashSet::new();
            for slot in &sched.slots {
                let mut parent = None;
                for c in slot.tokens.chunks_exact(KV_EVENT_BLOCK) {
                    let id = block_id(parent, c);
                    want.insert(id);
                    parent = Some(id);
                }
            }
            assert_eq!(replay, want, "round {round}");
        }
        // The shared 32-token prefix of `base` and `branch` was told once in round 0.
        assert!(stored_ever > 0);
    }

    /// With `token_deltas` every generated token comes in a delta of its own, in order; the text
    /// is the same.
    #[test]
    fn token_deltas_send_every_token_at_once() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let mut sched = Scheduler::new(&model, config(1, 64), stats.clone());
        let prompt = model.tokenizer.encode("Once upon a time", true, false).unwrap();
        let (plain, plain_log) = logged(&stats, &prompt, 16);
        assert!(sched.admit(plain).is_ok());
        while sched.step() > 0 {}
        let (mut req, log) = logged(&stats, &prompt, 16);
        req.token_deltas = true;
        assert!(sched.admit(req).is_ok());
        while sched.step() > 0 {}
        let tokens = |log: &Log| -> Vec<Vec<u32>> {
            let ev = log.lock().unwrap();
            ev.iter()
                .filter_map(|e| if let Event::Delta { tokens, .. } = e { Some(tokens.clone()) } else { None })
                .collect()
        };
        let each = tokens(&log);
        assert_eq!(each.len(), 16);
        assert!(each.iter().all(|t| t.len() == 1));
        assert_eq!(each.concat(), tokens(&plain_log).concat());
        assert_eq!(text(&log), text(&plain_log));
    }

    /// A prompt that shares only a few leading tokens with a cached slot takes an empty slot, so
    /// the cached sequence's prefix survives for its follow-up (a chat template's first words do
    /// not evict another conversation).
    #[test]
    fn a_few_shared_tokens_do_not_evict_a_cached_prefix() {
        let model = synth("Q8_0");
        let stats = Arc::new(SchedulerStats::default());
        let mut sched = Scheduler::new(&model, config(2, 64), stats.clone());
        let a: Vec<u32> = (0..48).map(|i| 100 + i).collect();
        let mut b: Vec<u32> = a[..5].to_vec();
        b.extend((0..40).map(|i| 500 + i));
        for p in [&a, &b] {
            let (req, _) = logged(&stats, p, 4);
            assert!(sched.admit(req).is_ok());
            while sched.step() > 0 {}
        }
        assert!(sched.slots.iter().any(|s| s.tokens.starts_with(&a)), "the first prompt's slot kept its cache");
        let (req, log) = logged(&stats, &a, 4);
        assert!(sched.admit(req).is_ok());
        while sched.step() > 0 {}
        let ev = log.lock().unwrap();
        let Some(Event::Done(f)) = ev.last() else { panic!("{ev:?}") };
        assert!(f.cached_tokens >= MIN_REUSE, "the follow-up found its prefix: {f:?}");
    }
}
