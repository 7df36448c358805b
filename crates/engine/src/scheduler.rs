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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use kiln_model::{forward_batch, KvCache, Logits, Precision, SeqStep, Workspace};
use kiln_tokenizer::StreamDecoder;

use crate::constraint::Constraint;
use crate::session::{find_stop, held_back};
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
    /// Where this request's events go.
    pub sink: Box<dyn EventSink>,
    /// When the request was queued (for queue time).
    pub submitted: Instant,
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
    /// string), with the tokens generated since the previous delta when log-probabilities were asked.
    Delta { text: String, logprobs: Vec<TokenLogprob> },
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
    /// Most prompt tokens evaluated in one step over all slots. A long prompt is read in chunks so
    /// the sequences already generating are not stalled for the whole prompt.
    pub prefill_budget: usize,
}

/// Counters the scheduler keeps up to date, read by whoever reports metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Requests submitted but not yet taken into a slot. The submitter increments it before
    /// sending; the scheduler decrements it when it takes the request off the channel.
    pub queued: AtomicUsize,
    /// Slots holding a running request.
    pub active: AtomicUsize,
    pub prompt_tokens_evaluated: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Time spent in forward steps, in microseconds.
    pub busy_micros: AtomicU64,
}

struct Slot<'m> {
    cache: KvCache,
    /// Tokens whose keys and values are in `cache`, in order.
    tokens: Vec<u32>,
    /// Tokens to feed at the next step.
    feed: Vec<u32>,
    /// Step counter value when the slot was last used (least recently used wins ties).
    last_used: u64,
    seq: Option<Sequence<'m>>,
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
    admitted: Instant,
    first_token: Option<Instant>,
}

pub struct Scheduler<'m> {
    model: &'m Model,
    cfg: SchedulerConfig,
    slots: Vec<Slot<'m>>,
    ws: Workspace,
    step_no: u64,
    stats: std::sync::Arc<SchedulerStats>,
}

/// Why a sequence leaves its slot.
enum Exit {
    Finished(FinishReason),
    /// The listener went away: nothing more to send.
    Gone,
    Failed(String),
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, cfg: SchedulerConfig, stats: std::sync::Arc<SchedulerStats>) -> Scheduler<'m> {
        let slots = (0..cfg.n_slots.max(1))
            .map(|_| Slot {
                cache: KvCache::new(&model.weights.cfg, cfg.n_ctx),
                tokens: Vec::new(),
                feed: Vec::new(),
                last_used: 0,
                seq: None,
            })
            .collect();
        Scheduler { model, cfg, slots, ws: Workspace::default(), step_no: 0, stats }
    }

    pub fn n_active(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(|s| s.seq.is_none())
    }

    /// Takes requests from `rx` into free slots and steps until `rx` is closed and every slot is
    /// idle, or until `cancel` is set (then running and queued requests end as cancelled).
    pub fn run(&mut self, rx: &Receiver<Request>, cancel: &AtomicBool) {
        let mut open = true;
        loop {
            if cancel.load(Ordering::SeqCst) {
                self.cancel_all();
                while let Ok(mut r) = rx.try_recv() {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    r.sink.send(Event::Error("the server is shutting down".into()));
                }
                return;
            }
            while open && self.has_free_slot() {
                let got = if self.n_active() == 0 {
                    // Idle: wait, but wake up now and then to see the cancel flag.
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(r) => Some(r),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                };
                let Some(r) = got else { break };
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                // A slot is free, so the request is never handed back.
                let _ = self.admit(r);
            }
            if self.n_active() == 0 {
                if !open {
                    return;
                }
                continue;
            }
            self.step();
        }
    }

    /// Puts `req` into the free slot sharing the longest prefix with its prompt. Returns the
    /// request back when no slot is free.
    pub fn admit(&mut self, mut req: Request) -> Result<(), Box<Request>> {
        let n_ctx = self.cfg.n_ctx;
        if req.sink.is_closed() {
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
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .map(|(i, s)| (common_prefix(&s.tokens, &req.prompt), std::cmp::Reverse(s.last_used), i))
            .max();
        let Some((common, _, i)) = best else { return Err(Box::new(req)) };
        // At least one prompt token must run to produce logits.
        let keep = common.min(req.prompt.len() - 1);
        let slot = &mut self.slots[i];
        slot.cache.truncate(keep);
        slot.tokens.truncate(keep);
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
            admitted: Instant::now(),
            first_token: None,
        });
        self.stats.active.store(self.n_active(), Ordering::SeqCst);
        Ok(())
    }

    /// One batched forward step over every active slot, then sampling for those that produced
    /// logits. Returns how many slots are still active.
    pub fn step(&mut self) -> usize {
        self.step_no += 1;
        // Drop the sequences nobody listens to before spending a step on them.
        for i in 0..self.slots.len() {
            if self.slots[i].seq.as_ref().is_some_and(|s| s.req.sink.is_closed()) {
                self.exit(i, Exit::Gone);
            }
        }
        // Choose what each slot feeds: a generating sequence its last token (already in `feed`),
        // a reading one the next chunk of its prompt within the step's budget.
        let mut budget = self.cfg.prefill_budget.max(1);
        let mut produces = vec![false; self.slots.len()];
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(seq) = slot.seq.as_mut() else { continue };
            if seq.prompt_left.is_empty() {
                produces[i] = !slot.feed.is_empty();
                continue;
            }
            if budget == 0 {
                continue;
            }
            let n = seq.prompt_left.len().min(budget);
            budget -= n;
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
                steps.push(SeqStep { cache, tokens: feed, want: Logits::Last });
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
            std::thread::scope(|s| {
                let masking = (!masks.is_empty()).then(|| {
                    s.spawn(move || {
                        // A failure here shows again (and ends its request) when the mask is applied.
                        for c in masks {
                            let _ = c.prepare();
                        }
                    })
                });
                let r = forward_batch(model, &mut steps, precision, ws, None);
                if let Some(h) = masking {
                    let _ = h.join();
                }
                r
            })
        };
        self.stats.busy_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
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
        for (&i, mut logits) in order.iter().zip(all_logits) {
            let slot = &mut self.slots[i];
            let fed = std::mem::take(&mut slot.feed);
            slot.last_used = self.step_no;
            if slot.seq.as_ref().is_some_and(|s| s.generated == 0) {
                self.stats.prompt_tokens_evaluated.fetch_add(fed.len() as u64, Ordering::Relaxed);
            }
            slot.tokens.extend_from_slice(&fed);
            if !produces[i] {
                continue;
            }
            if let Some(exit) = self.advance(i, &mut logits) {
                self.exit(i, exit);
            }
        }
        self.n_active()
    }

    /// Samples the next token of slot `i` from `logits` and hands out the text that became final.
    fn advance(&mut self, i: usize, logits: &mut [f32]) -> Option<Exit> {
        let tok = &self.model.tokenizer;
        let slot = &mut self.slots[i];
        let n_ctx = slot.cache.n_ctx;
        let seq = slot.seq.as_mut()?;
        let lp = seq.req.logprobs.map(|k| token_logprobs(logits, k));
        if let Some(c) = seq.constraint.as_mut() {
            if let Err(e) = c.apply(logits) {
                return Some(Exit::Failed(e.to_string()));
            }
        }
        let next = seq.sampler.sample(logits);
        seq.sampler.accept(next);
        seq.first_token.get_or_insert_with(Instant::now);
        // Under a constraint an end-of-generation token is drawn only where the output may end.
        if (seq.req.stop_at_eog || seq.constraint.is_some()) && tok.is_eog(next) {
            return Some(Exit::Finished(FinishReason::Stop));
        }
        if let Some(c) = seq.constraint.as_mut() {
            if let Err(e) = c.accept(next) {
                return Some(Exit::Failed(e.to_string()));
            }
        }
        seq.generated += 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some((logprob, top)) = lp {
            let piece = |t: u32| tok.token_to_piece(t).unwrap_or_default();
            let top = top.into_iter().map(|(t, l)| (t, piece(t), l)).collect();
            seq.logprobs.push(TokenLogprob { token: next, bytes: piece(next), logprob: logprob[next as usize], top });
        }
        match seq.decoder.push(next) {
            Ok(text) => seq.pending.push_str(&text),
            Err(e) => return Some(Exit::Failed(format!("decoding token {next}: {e}"))),
        }
        if let Some(cut) = find_stop(&seq.pending, &seq.req.stop) {
            seq.pending.truncate(cut);
            if !flush(seq, cut) {
                return Some(Exit::Gone);
            }
            return Some(Exit::Finished(FinishReason::Stop));
        }
        let safe = seq.pending.len() - held_back(&seq.pending, &seq.req.stop);
        if safe > 0 && !flush(seq, safe) {
            return Some(Exit::Gone);
        }
        if seq.constraint.as_ref().is_some_and(Constraint::is_complete) {
            return Some(Exit::Finished(FinishReason::Stop));
        }
        if seq.generated >= seq.req.max_tokens || slot.tokens.len() + 1 > n_ctx {
            return Some(Exit::Finished(FinishReason::Length));
        }
        slot.feed.clear();
        slot.feed.push(next);
        None
    }

    /// Ends the sequence in slot `i`; the slot keeps its cache and tokens for prefix reuse.
    fn exit(&mut self, i: usize, why: Exit) {
        let slot = &mut self.slots[i];
        slot.feed.clear();
        let Some(mut seq) = slot.seq.take() else { return };
        match why {
            Exit::Gone => {}
            Exit::Failed(msg) => {
                // The cache may be half-written for this sequence: forget it.
                slot.cache.clear();
                slot.tokens.clear();
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
                if (n > 0 || !seq.logprobs.is_empty()) && !flush(&mut seq, n) {
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

/// Sends `seq.pending[..upto]` (and the log-probabilities gathered so far) and removes it from
/// `pending`. Returns `false` when the listener is gone.
fn flush(seq: &mut Sequence<'_>, upto: usize) -> bool {
    let text: String = seq.pending.drain(..upto).collect();
    let logprobs = std::mem::take(&mut seq.logprobs);
    seq.req.sink.send(Event::Delta { text, logprobs })
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

    struct Collect(std::sync::Arc<std::sync::Mutex<Vec<Event>>>);

    impl EventSink for Collect {
        fn send(&mut self, event: Event) -> bool {
            self.0.lock().unwrap().push(event);
            true
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    /// Prompts read in 5-token chunks alongside other sequences' decoding, and a second round that
    /// reuses the slots' cached prefixes, give exactly the greedy text of a lone Session.
    #[test]
    fn chunked_prefill_and_prefix_reuse_match_session() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth/synth-tiny-Q4_K.gguf");
        let model = Model::load(&path).expect("synth model");
        let cfg = SchedulerConfig { n_slots: 3, n_ctx: 256, precision: Precision::Fast, prefill_budget: 5 };
        let stats = std::sync::Arc::new(SchedulerStats::default());
        let mut sched = Scheduler::new(&model, cfg, stats.clone());
        let texts =
            ["The quick brown fox jumps over the lazy dog", "a b c d e f g h i j k", "Once upon a time, far away"];
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenizer.encode(t, true, false).unwrap()).collect();
        let want: Vec<String> = prompts
            .iter()
            .map(|p| {
                let mut s = crate::Session::new(&model, 256, Precision::Fast);
                let opts = crate::GenerateOptions { max_tokens: 20, stop: vec![], stop_at_eog: false };
                s.generate(p, &opts, &mut Sampler::new(SamplingParams::greedy()), |_| true).unwrap().text
            })
            .collect();
        for round in 0..2 {
            let logs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                    let req = Request {
                        prompt: p.clone(),
                        params: SamplingParams::greedy(),
                        max_tokens: 20,
                        stop: vec![],
                        stop_at_eog: false,
                        logprobs: None,
                        constraint: None,
                        sink: Box::new(Collect(log.clone())),
                        submitted: Instant::now(),
                    };
                    assert!(sched.admit(req).is_ok());
                    log
                })
                .collect();
            while sched.step() > 0 {}
            for (i, log) in logs.iter().enumerate() {
                let ev = log.lock().unwrap();
                let text: String = ev
                    .iter()
                    .filter_map(|e| if let Event::Delta { text, .. } = e { Some(text.as_str()) } else { None })
                    .collect();
                assert_eq!(text, want[i], "round {round}, prompt {i}");
                let Some(Event::Done(f)) = ev.last() else { panic!("no Done: {ev:?}") };
                assert_eq!((f.reason, f.completion_tokens), (FinishReason::Length, 20));
                // Round 2 finds each prompt in the slot it used before (all but its last token).
                assert_eq!(f.cached_tokens, if round == 0 { 0 } else { prompts[i].len() - 1 }, "round {round}");
            }
        }
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let (lp, top) = token_logprobs(&[1.0, 3.0, 2.0, 3.0], 3);
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((lp[1] - lp[2] - 1.0).abs() < 1e-6);
    }
}
