//! Speculative decoding: tokens proposed cheaply (by prompt lookup or a draft model) are checked
//! by the model in one forward call of several tokens, which reads the weights once for all of
//! them. A drafted token is kept only where the model draws that very token: at each position the
//! sampler draws as plain decoding does (the same logits — a verification of fewer than 16 tokens
//! runs on the per-token kernels, whose every row is the one a single step computes — and the same
//! random number, one per position), and the draft is accepted when the draw is the draft. So the
//! output is plain decoding's token for token, greedy or sampled with a seed. For a proposal that
//! is a function of the history (prompt lookup, a draft model's most likely token) this is the
//! accept/reject scheme of speculative sampling: the draft is accepted with its probability p(d),
//! and otherwise the token is drawn from the rest of the distribution.
//!
//! A [`Speculator`] belongs to one sequence. It proposes drafts, measures what verifications
//! cost and how often drafts are accepted, and drafts only as many tokens as pay
//! ([`controller`]).

pub mod controller;
pub mod draft_model;
pub mod ngram;

use anyhow::{bail, Result};

use controller::{best_draft_len, pooled_rate, Acceptance, CostModel, MAX_DRAFT};
pub use draft_model::{check_vocabulary, DraftModel};

/// Where drafts come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecMode {
    /// No speculation: one token per forward step.
    Off,
    /// Prompt lookup: continuations of earlier occurrences of the last tokens ([`ngram`]).
    #[default]
    Ngram,
    /// A draft model (`--model-draft`).
    Draft,
}

impl SpecMode {
    pub fn name(self) -> &'static str {
        match self {
            SpecMode::Off => "off",
            SpecMode::Ngram => "ngram",
            SpecMode::Draft => "draft",
        }
    }
}

impl std::str::FromStr for SpecMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SpecMode, String> {
        match s {
            "off" => Ok(SpecMode::Off),
            "ngram" => Ok(SpecMode::Ngram),
            "draft" => Ok(SpecMode::Draft),
            _ => Err(format!("unknown speculation mode {s:?} (expected off, ngram or draft)")),
        }
    }
}

impl std::fmt::Display for SpecMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a sequence speculates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecOptions {
    pub mode: SpecMode,
    /// Most drafted tokens per verification (at most [`MAX_DRAFT`]; fewer when they do not pay).
    pub draft_max: usize,
}

/// The default most drafted tokens per verification.
pub const DEFAULT_DRAFT_MAX: usize = 14;

impl Default for SpecOptions {
    fn default() -> Self {
        SpecOptions { mode: SpecMode::default(), draft_max: DEFAULT_DRAFT_MAX }
    }
}

impl SpecOptions {
    pub fn off() -> SpecOptions {
        SpecOptions { mode: SpecMode::Off, draft_max: 0 }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.draft_max > MAX_DRAFT {
            return Err(format!(
                "draft-max {} is above {MAX_DRAFT} (a verification of more tokens would leave the per-token kernels and change the results)",
                self.draft_max
            ));
        }
        Ok(())
    }
}

/// Counts of one sequence's (or a server's) speculation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Forward calls that verified at least one drafted token.
    pub verifications: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl SpecStats {
    pub fn add(&mut self, other: &SpecStats) {
        self.verifications += other.verifications;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
    }

    /// Accepted drafted tokens per drafted token.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Tokens a verification produced on average: its accepted drafts and the model's own token.
    pub fn tokens_per_verification(&self) -> f64 {
        if self.verifications == 0 {
            0.0
        } else {
            (self.accepted + self.verifications) as f64 / self.verifications as f64
        }
    }

    /// `drafted 120, accepted 97 (80.8%), 3.4 tokens per verification`
    pub fn summary(&self) -> String {
        format!(
            "drafted {}, accepted {} ({:.1}%), {:.2} tokens per verification",
            self.drafted,
            self.accepted,
            100.0 * self.acceptance(),
            self.tokens_per_verification()
        )
    }
}

/// One sequence's drafting: where drafts come from, what verifications cost, how often drafts
/// were accepted (per length of the prompt-lookup match, which predicts acceptance).
pub struct Speculator<'m> {
    pub options: SpecOptions,
    draft: Option<DraftModel<'m>>,
    cost: CostModel,
    acceptance: [Acceptance; ngram::MAX_NGRAM + 1],
    /// Mean seconds of one draft-model step.
    draft_token_secs: Option<f64>,
    /// Which acceptance estimate the pending draft belongs to.
    pending_bucket: usize,
    /// Tests: drafts read from a script (the whole expected sequence, right or wrong at will)
    /// instead of from the options' drafter.
    script: Option<Vec<u32>>,
    /// Tests: every proposal whole, without weighing its cost.
    full_drafts: bool,
    pub stats: SpecStats,
}

impl<'m> Speculator<'m> {
    /// A speculator for `options`; `draft` is required for [`SpecMode::Draft`] and unused
    /// otherwise. `None` for [`SpecMode::Off`].
    pub fn new(options: SpecOptions, draft: Option<DraftModel<'m>>) -> Result<Option<Speculator<'m>>> {
        options.validate().map_err(anyhow::Error::msg)?;
        if options.mode == SpecMode::Off || options.draft_max == 0 {
            return Ok(None);
        }
        if options.mode == SpecMode::Draft && draft.is_none() {
            bail!("speculation with a draft model needs one (--model-draft FILE)");
        }
        let draft = if options.mode == SpecMode::Draft { draft } else { None };
        Ok(Some(Speculator {
            options,
            draft,
            cost: CostModel::default(),
            acceptance: Default::default(),
            draft_token_secs: None,
            pending_bucket: 0,
            script: None,
            full_drafts: false,
            stats: SpecStats::default(),
        }))
    }

    /// For tests: a speculator that proposes `script[history.len() ..]` (the whole sequence it
    /// expects, prompt included, with wrong tokens where rejections should be exercised), up to
    /// `draft_max` tokens every step.
    #[doc(hidden)]
    pub fn scripted(script: Vec<u32>, draft_max: usize) -> Result<Speculator<'static>> {
        let options = SpecOptions { mode: SpecMode::Ngram, draft_max };
        let mut s = Speculator::new(options, None)?.ok_or_else(|| anyhow::anyhow!("draft_max 0"))?;
        s.script = Some(script);
        s.full_drafts = true;
        Ok(s)
    }

    /// For tests: every proposal is verified whole (no cost model), so that verifications of
    /// every size run.
    #[doc(hidden)]
    pub fn always_full_drafts(mut self) -> Self {
        self.full_drafts = true;
        self
    }

    /// Drafted tokens to verify after `history` (whose last token is the one to evaluate next),
    /// at most `room` (what is left of the output and the context): as many as are expected to
    /// pay, possibly none.
    pub fn propose(&mut self, history: &[u32], room: usize) -> Result<Vec<u32>> {
        let room = room.min(self.options.draft_max);
        if room == 0 {
            return Ok(Vec::new());
        }
        if let Some(script) = &self.script {
            let from = history.len().min(script.len());
            return Ok(script[from..(from + room).min(script.len())].to_vec());
        }
        match self.options.mode {
            SpecMode::Off => Ok(Vec::new()),
            SpecMode::Ngram => {
                let p = ngram::propose(history, room);
                if p.tokens.is_empty() {
                    return Ok(Vec::new());
                }
                let rate = self.acceptance[p.matched].optimistic_rate(pooled_rate(&self.acceptance));
                let k = if self.full_drafts {
                    p.tokens.len()
                } else {
                    best_draft_len(p.tokens.len(), rate, &self.cost, |_| 0.0)
                };
                if k == 0 {
                    self.acceptance[p.matched].fade();
                }
                self.pending_bucket = p.matched;
                Ok(p.tokens[..k].to_vec())
            }
            SpecMode::Draft => {
                let acc = &mut self.acceptance[0];
                let per = self.draft_token_secs.unwrap_or(0.0);
                let rate = acc.optimistic_rate(Acceptance::PRIOR);
                let k =
                    if self.full_drafts { room } else { best_draft_len(room, rate, &self.cost, |k| k as f64 * per) };
                if k == 0 {
                    acc.fade();
                    return Ok(Vec::new());
                }
                self.pending_bucket = 0;
                let draft = self.draft.as_mut().expect("checked in new");
                let (tokens, secs) = draft.propose(history, k)?;
                if let Some(s) = secs {
                    let old = self.draft_token_secs.unwrap_or(s);
                    self.draft_token_secs = Some(old + 0.2 * (s - old));
                }
                Ok(tokens)
            }
        }
    }

    /// The draft model's state, given back when the sequence ends (a server slot keeps it for the
    /// next request, its cache reusable by prefix).
    pub fn into_draft(self) -> Option<DraftModel<'m>> {
        self.draft
    }

    /// A forward step of `n` tokens took `seconds`.
    pub fn record_step(&mut self, n: usize, seconds: f64) {
        self.cost.record(n, seconds);
    }

    /// `accepted` of the `drafted` tokens of the last proposal were accepted.
    pub fn record_verification(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.acceptance[self.pending_bucket].record(drafted, accepted);
        self.stats.verifications += 1;
        self.stats.drafted += drafted as u64;
        self.stats.accepted += accepted as u64;
    }
}
