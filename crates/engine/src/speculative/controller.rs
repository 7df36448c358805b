//! How many drafted tokens to verify: the number that maximises expected tokens per second, from
//! what verifications of each size were measured to cost on this machine and how often drafts of
//! this kind were accepted lately.
//!
//! Where the weights' memory traffic dominates a step (a GPU, a many-core CPU) a verification of
//! k tokens costs little more than one token, and long drafts pay even when half is rejected; on a
//! CPU whose generation kernels are bound by arithmetic (two cores) each verified token costs
//! most of a step, and only drafts that are nearly always right pay. Measuring both instead of
//! assuming either keeps drafting from costing more than it gains: where it does not help, the
//! controller stops drafting and only probes again now and then.

/// Most tokens one verification may hold (the token to evaluate and its drafts). Fewer than
/// [`kiln_quant::gemm::MIN_TOKENS`] keeps every row on the per-token generation kernels, so a
/// verification's logits are bit for bit those of single steps.
pub const MAX_VERIFY: usize = kiln_quant::gemm::MIN_TOKENS - 1;
/// Most drafted tokens per verification.
pub const MAX_DRAFT: usize = MAX_VERIFY - 1;

/// Measured seconds of a forward step of `n` tokens, `n = 1 ..= MAX_VERIFY`.
#[derive(Clone, Debug)]
pub struct CostModel {
    mean: [f64; MAX_VERIFY + 1],
    seen: [bool; MAX_VERIFY + 1],
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel { mean: [0.0; MAX_VERIFY + 1], seen: [false; MAX_VERIFY + 1] }
    }
}

impl CostModel {
    /// Weight of the newest measurement (the context grows, so costs drift).
    const NEW: f64 = 0.2;
    /// Before any verification was measured: what one more token is assumed to add to a step,
    /// as a fraction of a one-token step (optimistic enough that drafting gets tried).
    const PRIOR_SLOPE: f64 = 0.5;

    pub fn record(&mut self, n: usize, seconds: f64) {
        if n == 0 || n > MAX_VERIFY || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        // A step the OS preempted can take several times its cost; one such sample must not
        // stop drafting for good (a size not drafted is not measured again), so a sample counts
        // for at most twice the current estimate.
        self.mean[n] = if self.seen[n] {
            let s = seconds.min(2.0 * self.mean[n]);
            self.mean[n] + Self::NEW * (s - self.mean[n])
        } else {
            seconds
        };
        self.seen[n] = true;
    }

    /// Seconds of a step of `n` tokens, relative to a one-token step when nothing is known: the
    /// measured mean where there is one, else a line through the one-token cost and the
    /// measured sizes' mean slope. A one-token cost not yet measured (a sequence that drafted
    /// from its first step, as a draft model does) is inferred from the measured sizes with the
    /// prior slope, in seconds like them: a unit "1.0" beside measured seconds made every
    /// verification look cheaper than a plain step, and drafting that never paid went on.
    pub fn seconds(&self, n: usize) -> f64 {
        let n = n.clamp(1, MAX_VERIFY);
        if self.seen[n] {
            return self.mean[n];
        }
        let inferred_one = (2..=MAX_VERIFY)
            .filter(|&m| self.seen[m])
            .map(|m| self.mean[m] / (1.0 + Self::PRIOR_SLOPE * (m - 1) as f64))
            .reduce(f64::min);
        let one = if self.seen[1] { self.mean[1] } else { inferred_one.unwrap_or(1.0) };
        let slopes: Vec<f64> =
            (2..=MAX_VERIFY).filter(|&m| self.seen[m]).map(|m| (self.mean[m] - one) / (m - 1) as f64).collect();
        let slope = if slopes.is_empty() {
            Self::PRIOR_SLOPE * one
        } else {
            (slopes.iter().sum::<f64>() / slopes.len() as f64).max(0.0)
        };
        one + slope * (n - 1) as f64
    }
}

/// How often drafted tokens were accepted lately, as the probability that each next drafted token
/// is accepted given the previous one was (drafts are accepted as a prefix).
#[derive(Clone, Debug)]
pub struct Acceptance {
    accepted: f64,
    tried: f64,
}

impl Acceptance {
    /// The estimate before evidence, and how many tokens' worth of evidence it counts as.
    pub const PRIOR: f64 = 0.6;
    /// Standard deviations of optimism: enough that a kind of draft with no evidence gets tried
    /// (0.6 + 0.5 · 0.28 = 0.74), little enough that probing where drafts fail costs little.
    const OPTIMISM: f64 = 0.5;
    const PRIOR_WEIGHT: f64 = 2.0;
    /// Evidence fades by this factor per verification, and per step without a draft, so the
    /// estimate follows the text and a kind of draft that stopped paying gets tried again.
    const KEEP: f64 = 0.99;

    pub fn new() -> Acceptance {
        Acceptance { accepted: 0.0, tried: 0.0 }
    }

    pub fn rate(&self) -> f64 {
        self.rate_around(Self::PRIOR)
    }

    /// The rate with `prior` as the estimate before this evidence (e.g. what drafts of other
    /// kinds achieved: [`pooled_rate`]).
    pub fn rate_around(&self, prior: f64) -> f64 {
        (self.accepted + prior * Self::PRIOR_WEIGHT) / (self.tried + Self::PRIOR_WEIGHT)
    }

    /// [`Self::rate_around`] plus half a standard deviation of its uncertainty: what drafting is
    /// decided on. Optimism where little is known makes the controller try a kind of draft it
    /// has no (or only faded) evidence about, and learn what it is worth; with evidence the
    /// margin shrinks to nothing.
    pub fn optimistic_rate(&self, prior: f64) -> f64 {
        let m = self.rate_around(prior);
        (m + Self::OPTIMISM * (m * (1.0 - m) / (self.tried + Self::PRIOR_WEIGHT + 1.0)).sqrt()).min(1.0)
    }

    /// `accepted` of `drafted` tokens were accepted (a prefix of them).
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        self.fade();
        // Each accepted token is a success; the first rejected one a failure; the ones after it
        // were never tested.
        self.accepted += accepted as f64;
        self.tried += (accepted + usize::from(accepted < drafted)) as f64;
    }

    pub fn fade(&mut self) {
        self.accepted *= Self::KEEP;
        self.tried *= Self::KEEP;
    }
}

/// The acceptance rate of all of `kinds`' evidence together: the prior of each kind's own rate,
/// so that a kind seen rarely (a longer lookup match) starts from what the others achieved in
/// this text instead of from nothing.
pub fn pooled_rate(kinds: &[Acceptance]) -> f64 {
    let mut all = Acceptance::new();
    for k in kinds {
        all.accepted += k.accepted;
        all.tried += k.tried;
    }
    all.rate()
}

impl Default for Acceptance {
    fn default() -> Self {
        Acceptance::new()
    }
}

/// The number of drafted tokens (0 ..= `available`) with the most expected tokens per second:
/// with acceptance rate `a` a draft of k gives `1 + a + … + a^k` tokens for a step of k + 1
/// tokens plus `draft_cost(k)` seconds of drafting.
pub fn best_draft_len(available: usize, a: f64, cost: &CostModel, draft_cost: impl Fn(usize) -> f64) -> usize {
    let a = a.clamp(0.0, 1.0);
    let (mut best, mut best_rate) = (0, 1.0 / cost.seconds(1));
    let mut expected = 1.0;
    let mut ak = 1.0;
    for k in 1..=available.min(MAX_DRAFT) {
        ak *= a;
        expected += ak;
        let rate = expected / (cost.seconds(k + 1) + draft_cost(k));
        if rate > best_rate {
            (best, best_rate) = (k, rate);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_model_interpolates_from_what_it_measured() {
        let mut c = CostModel::default();
        assert_eq!(c.seconds(1), 1.0);
        assert_eq!(c.seconds(3), 2.0, "prior: half a step per extra token");
        c.record(1, 0.010);
        c.record(5, 0.030);
        assert!((c.seconds(5) - 0.030).abs() < 1e-12);
        assert!((c.seconds(3) - 0.020).abs() < 1e-12, "{}", c.seconds(3));
        c.record(1, 0.020);
        assert!((c.seconds(1) - 0.012).abs() < 1e-12, "moving mean");
    }

    /// Every step a verification (a draft model drafts from the first step): the one-token cost
    /// is inferred in seconds, so a draft that is never accepted stops being drafted.
    #[test]
    fn one_token_cost_never_measured_is_inferred_in_seconds() {
        let mut c = CostModel::default();
        c.record(2, 0.15);
        assert!((c.seconds(1) - 0.1).abs() < 1e-12, "{}", c.seconds(1));
        assert_eq!(c.seconds(2), 0.15);
        // Nothing accepted lately, each drafted token costing 0.03 s of the draft model.
        let a = Acceptance { accepted: 0.0, tried: 10.0 }.optimistic_rate(Acceptance::PRIOR);
        assert_eq!(best_draft_len(8, a, &c, |k| 0.03 * k as f64), 0);
        // Drafts nearly always accepted still pay.
        let a = Acceptance { accepted: 30.0, tried: 30.0 }.optimistic_rate(Acceptance::PRIOR);
        assert!(best_draft_len(8, a, &c, |k| 0.003 * k as f64) > 0);
    }

    #[test]
    fn drafts_only_where_they_pay() {
        // Memory-bound: extra tokens nearly free → long drafts even at a middling rate.
        let mut cheap = CostModel::default();
        cheap.record(1, 1.0);
        cheap.record(8, 1.1);
        assert!(best_draft_len(14, 0.5, &cheap, |_| 0.0) >= 3);
        // Compute-bound (two cores): each extra token 0.65 of a step → only near-certain drafts.
        let mut dear = CostModel::default();
        dear.record(1, 1.0);
        dear.record(8, 1.0 + 7.0 * 0.65);
        assert_eq!(best_draft_len(14, 0.5, &dear, |_| 0.0), 0);
        assert_eq!(best_draft_len(14, 0.6, &dear, |_| 0.0), 0);
        assert!(best_draft_len(14, 0.98, &dear, |_| 0.0) >= 4);
        // Nothing available, nothing drafted.
        assert_eq!(best_draft_len(0, 1.0, &cheap, |_| 0.0), 0);
        // A draft model's own cost counts.
        assert_eq!(best_draft_len(14, 0.9, &cheap, |k| k as f64 * 2.0), 0);
    }

    #[test]
    fn acceptance_follows_evidence_and_fades_back() {
        let mut a = Acceptance::new();
        assert!((a.rate() - 0.6).abs() < 1e-12);
        for _ in 0..20 {
            a.record(4, 0);
        }
        assert!(a.rate() < 0.15, "{}", a.rate());
        let pooled = pooled_rate(&[a.clone(), Acceptance::new()]);
        assert!(pooled < 0.15, "a kind never tried starts from the others' rate: {pooled}");
        let low = a.optimistic_rate(Acceptance::PRIOR);
        for _ in 0..600 {
            a.fade();
        }
        assert!(a.rate() > 0.5, "evidence fades back to the prior: {}", a.rate());
        // Optimism: with no evidence the rate decided on is above the prior (so a kind of draft
        // gets tried), with evidence of failures it is low.
        assert!(Acceptance::new().optimistic_rate(0.6) > 0.7);
        assert!(low < 0.3, "{low}");
        assert!(a.optimistic_rate(Acceptance::PRIOR) > 0.7, "faded evidence, optimism again");
        for _ in 0..20 {
            a.record(4, 4);
        }
        assert!(a.rate() > 0.9, "{}", a.rate());
    }
}
