//! A conversation with a model: its KV cache, the tokens in it, and generation with stop handling.

use std::time::Instant;

use anyhow::{bail, Result};
use kiln_model::{forward, KvCache, Logits, Observer, Precision};

use crate::backend::SequenceForward;
use crate::constraint::Constraint;
use crate::speculative::Speculator;
use crate::{GpuModel, Model, Sampler};

pub struct Session<'m> {
    pub model: &'m Model,
    /// The CPU's KV cache (empty when the session runs on a device).
    pub cache: KvCache,
    /// Tokens whose keys and values are in the cache, in order.
    pub tokens: Vec<u32>,
    pub precision: Precision,
    n_ctx: usize,
    /// The forward pass on a GPU, with its own KV cache ([`Session::on_gpu`]).
    device: Option<Box<dyn SequenceForward + 'm>>,
}

#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop at end-of-generation tokens (EOS, EOT, <|im_end|> …).
    pub stop_at_eog: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller's callback asked to stop (Ctrl-C, client gone).
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens actually evaluated (the rest came from the cache).
    pub prompt_evaluated: usize,
    pub prompt_seconds: f64,
    pub gen_seconds: f64,
}

impl<'m> Session<'m> {
    /// A session whose context size was already checked ([`Session::try_new`] checks it).
    pub fn new(model: &'m Model, n_ctx: usize, precision: Precision) -> Session<'m> {
        Session {
            model,
            cache: KvCache::new(&model.weights.cfg, n_ctx),
            tokens: Vec::new(),
            precision,
            n_ctx,
            device: None,
        }
    }

    /// A session of `n_ctx` positions, if its KV cache has a size and fits in the memory available
    /// ([`kiln_model::check_kv_memory`]): an error naming the size instead of an overflow or an
    /// aborted allocation.
    pub fn try_new(model: &'m Model, n_ctx: usize, precision: Precision) -> Result<Session<'m>> {
        let cfg = &model.weights.cfg;
        kiln_model::check_kv_memory(cfg, n_ctx, 1)?;
        Ok(Session { model, cache: KvCache::try_new(cfg, n_ctx)?, tokens: Vec::new(), precision, n_ctx, device: None })
    }

    /// A session of `n_ctx` positions whose forward pass runs on `gpu` (the default path's
    /// semantics; the exact path and observers stay on the CPU).
    pub fn on_gpu(model: &'m Model, n_ctx: usize, gpu: &'m GpuModel) -> Result<Session<'m>> {
        Ok(Session {
            model,
            cache: KvCache::new(&model.weights.cfg, 0),
            tokens: Vec::new(),
            precision: Precision::Fast,
            n_ctx,
            device: Some(gpu.session(n_ctx)?),
        })
    }

    /// Whether the forward pass runs on a GPU.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Forgets every cached position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        match &mut self.device {
            Some(d) => d.truncate(len),
            None => self.cache.truncate(len),
        }
        self.tokens.truncate(len);
    }

    /// Appends `tokens` and returns the logits of the last one (`Logits::Last`) or of all.
    pub fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        self.eval_observed(tokens, want, None)
    }

    pub fn eval_observed(&mut self, tokens: &[u32], want: Logits, obs: Option<&mut dyn Observer>) -> Result<Vec<f32>> {
        let logits = match &mut self.device {
            Some(_) if obs.is_some() => bail!("observing the operations of a forward pass needs the CPU backend"),
            Some(d) => d.eval(tokens, want)?,
            None => forward(&self.model.weights, &mut self.cache, tokens, self.precision, want, obs)?,
        };
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Makes the cache hold exactly `prompt` and returns the last position's logits, reusing the
    /// longest prefix already cached. Returns (logits, tokens evaluated).
    pub fn load_prompt(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            bail!("the prompt is empty: nothing to generate from");
        }
        if prompt.len() > self.n_ctx() {
            bail!("the prompt has {} tokens but the context holds {} (raise --ctx)", prompt.len(), self.n_ctx());
        }
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let keep = common.min(prompt.len() - 1);
        self.truncate(keep);
        let logits = self.eval(&prompt[keep..], Logits::Last)?;
        Ok((logits, prompt.len() - keep))
    }

    /// Generates after `prompt`. `on_text` receives text as it becomes final (never half a UTF-8
    /// character, never a piece of a stop string) and returns `false` to cancel.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_constrained(prompt, opts, sampler, None, on_text)
    }

    /// [`Session::generate`] under an output constraint: each token is drawn from those the
    /// constraint allows, and generation ends when the constrained output is complete. The mask of
    /// the next token is computed on another thread while the forward pass runs.
    pub fn generate_constrained(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        sampler: &mut Sampler,
        constraint: Option<&mut Constraint>,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_with(prompt, opts, sampler, constraint, None, on_text)
    }

    /// [`Session::generate_constrained`] with speculative decoding: after each token the
    /// speculator may draft a few more, which one forward call verifies; greedy output is bit for
    /// bit the same as without it, sampled output has the same distribution.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        sampler: &mut Sampler,
        mut constraint: Option<&mut Constraint>,
        mut spec: Option<&mut Speculator<'_>>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let (mut logits, evaluated) = self.load_prompt(prompt)?;
        let prompt_seconds = t0.elapsed().as_secs_f64();
        for &t in prompt {
            sampler.accept(t);
        }
        let t1 = Instant::now();
        let tok = &self.model.tokenizer;
        let nv = self.model.weights.cfg.n_vocab;
        let mut decoder = tok.decoder();
        let mut out = Generation {
            tokens: Vec::new(),
            text: String::new(),
            stop_reason: StopReason::Length,
            prompt_tokens: prompt.len(),
            prompt_evaluated: evaluated,
            prompt_seconds,
            gen_seconds: 0.0,
        };
        // Text decoded but not yet handed out, because it may be the start of a stop string.
        let mut pending = String::new();
        let mut emitted = 0usize;
        // Drafted tokens whose logits rows follow the first row of `logits` (the token evaluated
        // with them comes first).
        let mut drafts: Vec<u32> = Vec::new();
        while out.tokens.len() < opts.max_tokens {
            // The cache holds the drafts too; what is rejected of them leaves it below.
            let base = self.tokens.len() - drafts.len();
            let mut accepted = 0;
            let mut next = 0;
            let finished = 'verify: {
                for (row, logits) in logits.chunks_exact_mut(nv).enumerate() {
                    if let Some(c) = constraint.as_deref_mut() {
                        c.apply(logits)?;
                    }
                    let draft = drafts.get(row).copied();
                    // The token plain decoding draws here (same logits, same random number): a
                    // draft is accepted when it is that token.
                    next = sampler.sample(logits);
                    sampler.accept(next);
                    let is_draft = draft == Some(next);
                    accepted += usize::from(is_draft);
                    if (opts.stop_at_eog || constraint.is_some()) && tok.is_eog(next) {
                        out.stop_reason = StopReason::Stop;
                        break 'verify true;
                    }
                    if let Some(c) = constraint.as_deref_mut() {
                        c.accept(next)?;
                    }
                    out.tokens.push(next);
                    pending.push_str(&decoder.push(next)?);
                    if let Some(cut) = find_stop(&pending, &opts.stop) {
                        pending.truncate(cut);
                        out.text.push_str(&pending[emitted..]);
                        out.stop_reason =
                            if on_text(&pending[emitted..]) { StopReason::Stop } else { StopReason::Cancelled };
                        pending.clear();
                        emitted = 0;
                        break 'verify true;
                    }
                    let safe = pending.len() - held_back(&pending, &opts.stop);
                    if safe > emitted {
                        let piece = &pending[emitted..safe];
                        out.text.push_str(piece);
                        let go_on = on_text(piece);
                        emitted = safe;
                        if !go_on {
                            out.stop_reason = StopReason::Cancelled;
                            break 'verify true;
                        }
                    }
                    if constraint.as_deref().is_some_and(Constraint::is_complete) {
                        out.stop_reason = StopReason::Stop;
                        break 'verify true;
                    }
                    if out.tokens.len() >= opts.max_tokens {
                        break 'verify true;
                    }
                    if !is_draft {
                        break;
                    }
                }
                false
            };
            if let Some(sp) = spec.as_deref_mut() {
                sp.record_verification(drafts.len(), accepted);
            }
            if finished {
                break;
            }
            // Keys and values of rejected drafts go; those of accepted ones stay.
            self.truncate(base + accepted);
            if self.tokens.len() >= self.n_ctx() {
                bail!(
                    "context full after {} generated tokens ({} positions; raise --ctx)",
                    out.tokens.len(),
                    self.n_ctx()
                );
            }
            drafts.clear();
            if let Some(sp) = spec.as_deref_mut() {
                let mut history = Vec::with_capacity(self.tokens.len() + 1);
                history.extend_from_slice(&self.tokens);
                history.push(next);
                // Room: what is left of the output after `next`'s successor, and of the context.
                let room = (opts.max_tokens - out.tokens.len() - 1).min(self.n_ctx() - self.tokens.len() - 1);
                drafts = sp.propose(&history, room)?;
            }
            let step = Instant::now();
            logits = if !drafts.is_empty() {
                let mut feed = Vec::with_capacity(drafts.len() + 1);
                feed.push(next);
                feed.extend_from_slice(&drafts);
                self.eval(&feed, Logits::All)?
            } else {
                match constraint.as_deref_mut() {
                    None => self.eval(&[next], Logits::Last)?,
                    Some(c) if !crate::constraint::overlap_masks() => {
                        c.prepare()?;
                        self.eval(&[next], Logits::Last)?
                    }
                    Some(c) => {
                        // The next mask is computed while the forward pass runs.
                        let (logits, mask) = std::thread::scope(|s| {
                            let mask = s.spawn(|| c.prepare());
                            let logits = self.eval(&[next], Logits::Last);
                            (logits, mask.join())
                        });
                        mask.map_err(|_| anyhow::anyhow!("the constraint's mask computation panicked"))??;
                        logits?
                    }
                }
            };
            if let Some(sp) = spec.as_deref_mut() {
                sp.record_step(drafts.len() + 1, step.elapsed().as_secs_f64());
            }
        }
        if out.stop_reason != StopReason::Cancelled {
            pending.push_str(&decoder.finish());
            if pending.len() > emitted {
                let rest = &pending[emitted..];
                out.text.push_str(rest);
                on_text(rest);
            }
        }
        out.gen_seconds = t1.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// Byte offset of the earliest stop string in `text`.
pub(crate) fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_helpers() {
        let stops = vec!["\n\n".to_string(), "User:".to_string()];
        assert_eq!(find_stop("abc\n\nd", &stops), Some(3));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(held_back("hello Us", &stops), 2);
        assert_eq!(held_back("hello\n", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
