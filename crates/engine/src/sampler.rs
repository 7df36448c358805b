//! Token sampling with llama.cpp's defaults and order: penalties → top-k → top-p → min-p →
//! temperature → draw. Temperature ≤ 0 is greedy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() {
            return Err("temperature must be a finite number".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top-p must be in [0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        // Written so that NaN fails the check too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(self.repeat_penalty > 0.0) || !self.repeat_penalty.is_finite() {
            return Err(format!("repeat penalty must be positive, got {}", self.repeat_penalty));
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return Err("frequency and presence penalties must be finite".into());
        }
        Ok(())
    }
}

/// The sampling fields of an API request as the client gave them (`None`: not given), checked
/// and resolved in one place for every front end (`kiln serve`'s OpenAI API, the Dynamo worker).
#[derive(Clone, Debug, Default)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    /// `-1` and `0` mean no limit (vLLM's and llama.cpp's conventions).
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Without one every request draws differently ([`random_seed`]), as with OpenAI.
    pub seed: Option<u64>,
}

/// A request that was refused: the field as the client spelled it (`None`: the combination), and
/// why.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: Option<&'static str>,
    pub message: String,
}

impl SamplingRequest {
    /// The parameters, with kiln's defaults for fields not given; `repeat_field` is how the front
    /// end names the repetition penalty (`repeat_penalty`, `repetition_penalty`), for messages.
    /// Ranges are OpenAI's where it has the field (temperature [0, 2], penalties [-2, 2]).
    pub fn resolve(&self, repeat_field: &'static str) -> Result<SamplingParams, FieldError> {
        let err = |field: &'static str, message: String| Err(FieldError { field: Some(field), message });
        let d = SamplingParams::default();
        let temperature = self.temperature.unwrap_or(d.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return err("temperature", format!("temperature must be in [0, 2], got {temperature}"));
        }
        let top_p = self.top_p.unwrap_or(d.top_p);
        if !(0.0..=1.0).contains(&top_p) {
            return err("top_p", format!("top_p must be in [0, 1], got {top_p}"));
        }
        let min_p = self.min_p.unwrap_or(d.min_p);
        if !(0.0..=1.0).contains(&min_p) {
            return err("min_p", format!("min_p must be in [0, 1], got {min_p}"));
        }
        let top_k = match self.top_k {
            None => d.top_k,
            Some(-1) | Some(0) => 0,
            Some(k) if k < 0 => return err("top_k", format!("top_k must be -1 or 0 (no limit) or positive, got {k}")),
            Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
        };
        let penalty = |v: Option<f32>, field: &'static str| -> Result<f32, FieldError> {
            let v = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(FieldError { field: Some(field), message: format!("{field} must be in [-2, 2], got {v}") });
            }
            Ok(v)
        };
        let presence_penalty = penalty(self.presence_penalty, "presence_penalty")?;
        let frequency_penalty = penalty(self.frequency_penalty, "frequency_penalty")?;
        let repeat_penalty = self.repeat_penalty.unwrap_or(d.repeat_penalty);
        // Written so that NaN fails too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(repeat_penalty > 0.0 && repeat_penalty <= 10.0) {
            return err(repeat_field, format!("{repeat_field} must be in (0, 10], got {repeat_penalty}"));
        }
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            seed: self.seed.unwrap_or_else(random_seed),
            ..d
        };
        params.validate().map_err(|message| FieldError { field: None, message })?;
        Ok(params)
    }
}

/// A seed that differs between calls (time and a counter through splitmix64: distinct even for
/// requests in the same nanosecond), for requests that give none.
pub fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut z = t ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens seen so far (prompt and generated), for the penalties.
    history: Vec<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng, history: Vec::new(), candidates: Vec::new() }
    }

    /// Records a token (prompt or generated) for the repetition penalties.
    pub fn accept(&mut self, token: u32) {
        self.history.push(token);
    }

    pub fn reset(&mut self) {
        self.history.clear();
        self.rng = ChaCha8Rng::seed_from_u64(self.params.seed);
    }

    /// Picks the next token from `logits` (which it may modify).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let probs = self.filter(logits);
        let r: f64 = self.rng.gen();
        draw(&self.candidates, &probs, r)
    }

    /// Penalised `logits` → the candidates that survive top-k, top-p and min-p (in
    /// `self.candidates`, most likely first) and their probabilities at the temperature.
    fn filter(&mut self, logits: &[f32]) -> Vec<f64> {
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Sorted descending, ties by id so results are reproducible.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        // Tokens a constraint forbade (−∞) are never drawn, not even by rounding at the end of
        // the cumulative sum below.
        let finite = c.iter().take_while(|x| x.1 > f32::NEG_INFINITY).count();
        c.truncate(finite.max(1));
        let probs = softmax(c.iter().map(|x| x.1), 1.0);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let max = c[0].1;
            // p_i ≥ min_p · p_max  ⇔  l_i ≥ l_max + ln(min_p)
            let floor = max + (p.min_p as f64).ln() as f32;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        softmax(c.iter().map(|x| x.1), p.temperature as f64)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0 {
            return;
        }
        let start = self.history.len().saturating_sub(p.penalty_last_n);
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in &self.history[start..] {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else { continue };
            // llama.cpp's convention: divide positive logits, multiply negative ones.
            if *l > 0.0 {
                *l /= p.repeat_penalty;
            } else {
                *l *= p.repeat_penalty;
            }
            *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// The candidate where the cumulative probability passes `r` (the last one if rounding leaves `r`
/// above the total).
fn draw(candidates: &[(u32, f32)], probs: &[f64], r: f64) -> u32 {
    let mut cum = 0.0;
    for (i, pr) in probs.iter().enumerate() {
        cum += pr;
        if r < cum {
            return candidates[i].0;
        }
    }
    candidates[candidates.len() - 1].0
}

/// Index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Softmax of `logits / temperature` in f64.
pub fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f64) -> Vec<f64> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.map(|l| ((l as f64 - max) / temperature).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One validator for every front end: defaults, the ranges, -1/0 as "no top-k limit", and
    /// the front end's own name for the repetition penalty in messages.
    #[test]
    fn sampling_request_resolves_and_refuses_with_the_field_name() {
        let d = SamplingParams::default();
        let p = SamplingRequest { seed: Some(7), ..Default::default() }.resolve("repeat_penalty").unwrap();
        assert_eq!(p, SamplingParams { seed: 7, ..d.clone() });
        for k in [-1, 0] {
            let p = SamplingRequest { top_k: Some(k), ..Default::default() }.resolve("x").unwrap();
            assert_eq!(p.top_k, 0);
        }
        let refused = |r: SamplingRequest| r.resolve("repetition_penalty").unwrap_err();
        let e = refused(SamplingRequest { top_k: Some(-2), ..Default::default() });
        assert_eq!(e.field, Some("top_k"));
        let e = refused(SamplingRequest { temperature: Some(2.5), ..Default::default() });
        assert_eq!((e.field, e.message.as_str()), (Some("temperature"), "temperature must be in [0, 2], got 2.5"));
        let e = refused(SamplingRequest { temperature: Some(f32::NAN), ..Default::default() });
        assert_eq!(e.field, Some("temperature"));
        let e = refused(SamplingRequest { top_p: Some(1.5), ..Default::default() });
        assert_eq!(e.field, Some("top_p"));
        let e = refused(SamplingRequest { min_p: Some(-0.1), ..Default::default() });
        assert_eq!(e.field, Some("min_p"));
        let e = refused(SamplingRequest { presence_penalty: Some(3.0), ..Default::default() });
        assert_eq!(e.field, Some("presence_penalty"));
        let e = refused(SamplingRequest { frequency_penalty: Some(f32::INFINITY), ..Default::default() });
        assert_eq!(e.field, Some("frequency_penalty"));
        let e = refused(SamplingRequest { repeat_penalty: Some(0.0), ..Default::default() });
        assert_eq!(
            (e.field, e.message.as_str()),
            (Some("repetition_penalty"), "repetition_penalty must be in (0, 10], got 0")
        );
        let e = refused(SamplingRequest { repeat_penalty: Some(f32::NAN), ..Default::default() });
        assert_eq!(e.field, Some("repetition_penalty"));
        // Two requests without a seed draw differently.
        let a = SamplingRequest::default().resolve("x").unwrap();
        let b = SamplingRequest::default().resolve("x").unwrap();
        assert_ne!(a.seed, b.seed);
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 97) as f32 / 10.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, temperature: 1.5, ..Default::default() });
            (0..50).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // top-k 40 of 100: every draw is among the 40 largest logits.
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[39];
        for t in run(3) {
            assert!(logits[t as usize] >= kth);
        }
    }

    #[test]
    fn min_p_and_top_k_one() {
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 5.0, 4.99]), 1);
        }
        // min-p 0.5: the token with p < 0.5·p_max (logit gap > ln 2) is never drawn.
        let mut s =
            Sampler::new(SamplingParams { top_k: 0, top_p: 1.0, min_p: 0.5, temperature: 1.0, ..Default::default() });
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [0.0, 0.5, -1.0]), 2);
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, repeat_penalty: 2.0, ..Default::default() });
        s.accept(0);
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.6,
            presence_penalty: 0.5,
            ..Default::default()
        });
        s.accept(1);
        s.accept(1);
        // 2.0 - 2·0.6 - 0.5 = 0.3 < 1.0
        assert_eq!(s.sample(&mut [1.0, 2.0]), 0);
    }

    /// The sampler's draws have its exact distribution (what speculative decoding's acceptance
    /// rests on: a drafted token is accepted when the draw is that token, so each token keeps this
    /// distribution): over 40,000 seeds the frequencies match the filtered probabilities
    /// (chi-square over the tokens top-p keeps: χ²(6), 0.999 quantile 22.46), and filtered-out
    /// tokens never come.
    #[test]
    fn draws_have_the_filtered_distribution() {
        let logits = [2.0f32, 1.5, 1.0, 0.8, 0.2, -0.5, -1.0, -3.0, -9.0];
        let params = SamplingParams { top_k: 0, top_p: 0.98, min_p: 0.0, temperature: 0.9, ..Default::default() };
        let mut s = Sampler::new(params.clone());
        let probs = s.filter(&logits);
        let mut exact = vec![0.0; logits.len()];
        for (c, p) in s.candidates.iter().zip(&probs) {
            exact[c.0 as usize] = *p;
        }
        let n = 40_000;
        let mut counts = vec![0usize; logits.len()];
        for seed in 0..n as u64 {
            let mut s = Sampler::new(SamplingParams { seed, ..params.clone() });
            counts[s.sample(&mut logits.clone()) as usize] += 1;
        }
        let kept: Vec<usize> = (0..logits.len()).filter(|&i| exact[i] > 0.0).collect();
        assert_eq!(kept.len(), 7, "top-p keeps 7 tokens: {exact:?}");
        for i in (0..logits.len()).filter(|i| !kept.contains(i)) {
            assert_eq!(counts[i], 0, "filtered-out token {i} was drawn");
        }
        let chi2: f64 = kept
            .iter()
            .map(|&i| {
                let e = exact[i] * n as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 22.46, "chi-square {chi2:.1}, counts {counts:?}, exact {exact:?}");
    }
}
