//! Parity against the float64 reference fixtures (`shared/fixtures/parity`): every case is run
//! teacher-forced through the exact and the default path, and compared with the truth.
//!
//! The fixtures hold the truth's top-20 logits at every position and its full logits at two
//! positions per case. Metrics use the full truth where it exists. Elsewhere, KL needs a full
//! distribution: there the exact path stands in for the truth — legitimate because the exact path
//! is itself checked against the truth at every position (top-20 everywhere, full vocabulary at
//! the full-logit positions) to rel-L2 ≤ 1e-4 first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_model::{Logits, Precision};
use serde::Deserialize;

use crate::{Model, Session};

#[derive(Deserialize, Debug)]
pub struct Fixture {
    pub model: String,
    pub n_vocab: usize,
    pub cases: Vec<Case>,
}

#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub continuation: Vec<u32>,
    /// `[position][rank] = (token, logit)`.
    pub truth_top: Vec<Vec<(u32, f64)>>,
    #[serde(default)]
    pub full_logits: BTreeMap<String, FullLogitFiles>,
    pub llamacpp: LlamaCppStats,
    pub llamacpp_batch: Option<LlamaCppStats>,
}

#[derive(Deserialize, Debug)]
pub struct FullLogitFiles {
    pub truth: String,
    pub llamacpp: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct LlamaCppStats {
    pub rel_l2: Vec<f64>,
    pub kl: Vec<f64>,
    pub top1_agree: usize,
    pub positions: usize,
    pub max_abs_top20: f64,
}

/// Accuracy of one path over all positions of all cases of a model.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PathStats {
    pub positions: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Largest rel-L2 over the truth's top-20 tokens (full vocabulary at full-logit positions).
    pub max_rel_l2: f64,
    pub top1_agree: usize,
    /// Positions where the argmax differs from the truth although the truth's top-2 gap ≥ 1e-3.
    pub argmax_mismatch_clear: usize,
    pub max_abs_top20: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelReport {
    pub model: String,
    pub cases: usize,
    pub exact: PathStats,
    /// The default path batched (the whole sequence in one call)…
    pub default: PathStats,
    /// …and one token per call, as in generation.
    pub default_step: PathStats,
    /// llama.cpp's numbers from the fixture (one token per call), and the better of its two modes
    /// (per call / batched), which is the bar kiln's default path must meet.
    pub llamacpp: PathStats,
    pub llamacpp_best_mean_kl: f64,
    pub llamacpp_best_top1: usize,
    /// Whether every greedy continuation was reproduced by exact-path greedy generation.
    pub failures: Vec<String>,
}

impl ModelReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The exact-path bars.
pub const EXACT_MAX_REL_L2: f64 = 1e-4;
pub const NEAR_TIE_GAP: f64 = 1e-3;

pub fn load_fixture(path: &Path) -> Result<Fixture> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_f32_file(path: &Path, n: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() != n * 4 {
        bail!("{}: {} bytes, expected {}", path.display(), bytes.len(), n * 4);
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// log-softmax in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// KL(softmax(p) ‖ softmax(q)) in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

pub fn rel_l2(ours: &[f64], truth: &[f64]) -> f64 {
    let num: f64 = ours.iter().zip(truth).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = truth.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

/// Where the default path runs in a parity check: the CPU (the model's own sessions), or another
/// backend computing the same function (`kiln parity --backend cuda`). The exact path, the
/// reference, always runs on the CPU.
pub trait DefaultPath {
    /// Logits `[tokens.len(), n_vocab]` at every position of `tokens` from an empty sequence: in
    /// one batch, or (`per_token`) one token per call through the KV cache.
    fn logits(&mut self, tokens: &[u32], per_token: bool) -> Result<Vec<f32>>;
}

/// The CPU default path.
pub struct CpuDefault<'a>(pub &'a Model);

impl DefaultPath for CpuDefault<'_> {
    fn logits(&mut self, tokens: &[u32], per_token: bool) -> Result<Vec<f32>> {
        let mut s = Session::new(self.0, tokens.len(), Precision::Fast);
        if !per_token {
            return s.eval(tokens, Logits::All);
        }
        let mut all = Vec::with_capacity(tokens.len() * self.0.weights.cfg.n_vocab);
        for &t in tokens {
            all.extend(s.eval(&[t], Logits::Last)?);
        }
        Ok(all)
    }
}

/// Runs every case of `fixture` (whose files live in `dir`) on `model`.
pub fn check_model(model: &Model, fixture: &Fixture, dir: &Path) -> Result<ModelReport> {
    check_model_with(model, fixture, dir, &mut CpuDefault(model))
}

/// As [`check_model`], with the default path computed by `default_path`.
pub fn check_model_with(
    model: &Model,
    fixture: &Fixture,
    dir: &Path,
    default_path: &mut dyn DefaultPath,
) -> Result<ModelReport> {
    let n_vocab = model.weights.cfg.n_vocab;
    if n_vocab != fixture.n_vocab {
        bail!("{}: model has {} tokens, fixture {}", fixture.model, n_vocab, fixture.n_vocab);
    }
    let mut exact = PathStats::default();
    let mut default = PathStats::default();
    let mut step = PathStats::default();
    let mut kl_sum_step = 0.0;
    let mut llama = PathStats::default();
    let (mut kl_sum_exact, mut kl_sum_default) = (0.0, 0.0);
    let (mut llama_kl_sum, mut llama_batch_kl_sum, mut llama_batch_top1) = (0.0, 0.0, 0usize);
    let mut failures = Vec::new();

    for case in &fixture.cases {
        let tokens: Vec<u32> = case.prompt_tokens.iter().chain(&case.continuation).copied().collect();
        let n_pos = tokens.len();
        if case.truth_top.len() != n_pos {
            bail!("{} {}: {} truth positions for {} tokens", fixture.model, case.name, case.truth_top.len(), n_pos);
        }
        let run = |precision| -> Result<Vec<f32>> {
            let mut s = Session::new(model, n_pos, precision);
            s.eval(&tokens, Logits::All)
        };
        let le = run(Precision::Exact)?;
        let ld = default_path.logits(&tokens, false)?;
        // The default path again, one token per call through the KV cache (generation's shape).
        let ls = default_path.logits(&tokens, true)?;
        if ld.len() != n_pos * n_vocab || ls.len() != n_pos * n_vocab {
            bail!("{} {}: the default path returned logits of the wrong size", fixture.model, case.name);
        }
        let mut full: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        for (p, files) in &case.full_logits {
            let p: usize = p.parse().with_context(|| format!("full_logits position {p:?}"))?;
            full.insert(p, read_f32_file(&dir.join(&files.truth), n_vocab)?);
        }
        for p in 0..n_pos {
            let top = &case.truth_top[p];
            let e = &le[p * n_vocab..(p + 1) * n_vocab];
            let d = &ld[p * n_vocab..(p + 1) * n_vocab];
            let st = &ls[p * n_vocab..(p + 1) * n_vocab];
            let truth_best = top[0].0;
            let near_tie = top.len() > 1 && top[0].1 - top[1].1 < NEAR_TIE_GAP;
            for (stats, ours) in [(&mut exact, e), (&mut default, d), (&mut step, st)] {
                stats.positions += 1;
                let tv: Vec<f64> = top.iter().map(|x| x.1).collect();
                let ov: Vec<f64> = top.iter().map(|x| ours[x.0 as usize] as f64).collect();
                let mut r = rel_l2(&ov, &tv);
                if let Some(t) = full.get(&p) {
                    let tf: Vec<f64> = t.iter().map(|&v| v as f64).collect();
                    let of: Vec<f64> = ours.iter().map(|&v| v as f64).collect();
                    r = r.max(rel_l2(&of, &tf));
                }
                stats.max_rel_l2 = stats.max_rel_l2.max(r);
                let abs = top.iter().map(|x| (ours[x.0 as usize] as f64 - x.1).abs()).fold(0.0, f64::max);
                stats.max_abs_top20 = stats.max_abs_top20.max(abs);
                let am = crate::sampler::argmax(ours);
                if am == truth_best {
                    stats.top1_agree += 1;
                } else if !near_tie {
                    stats.argmax_mismatch_clear += 1;
                }
            }
            // KL against the full truth where we have it, else against the exact path.
            let reference: &[f32] = full.get(&p).map(|v| v.as_slice()).unwrap_or(e);
            let kd = kl_divergence(reference, d);
            kl_sum_default += kd;
            default.max_kl = default.max_kl.max(kd);
            let ks = kl_divergence(reference, st);
            kl_sum_step += ks;
            step.max_kl = step.max_kl.max(ks);
            if let Some(t) = full.get(&p) {
                let ke = kl_divergence(t, e);
                kl_sum_exact += ke;
                exact.max_kl = exact.max_kl.max(ke);
            }
        }
        llama.positions += case.llamacpp.positions;
        llama.top1_agree += case.llamacpp.top1_agree;
        llama_kl_sum += case.llamacpp.kl.iter().sum::<f64>();
        llama.max_kl = case.llamacpp.kl.iter().cloned().fold(llama.max_kl, f64::max);
        llama.max_rel_l2 = case.llamacpp.rel_l2.iter().cloned().fold(llama.max_rel_l2, f64::max);
        llama.max_abs_top20 = llama.max_abs_top20.max(case.llamacpp.max_abs_top20);
        let b = case.llamacpp_batch.as_ref().unwrap_or(&case.llamacpp);
        llama_batch_kl_sum += b.kl.iter().sum::<f64>();
        llama_batch_top1 += b.top1_agree;
    }
    let n = default.positions.max(1) as f64;
    default.mean_kl = kl_sum_default / n;
    step.mean_kl = kl_sum_step / n;
    let n_full: usize = fixture.cases.iter().map(|c| c.full_logits.len()).sum();
    exact.mean_kl = kl_sum_exact / n_full.max(1) as f64;
    llama.mean_kl = llama_kl_sum / llama.positions.max(1) as f64;
    let llama_best_kl = llama.mean_kl.min(llama_batch_kl_sum / llama.positions.max(1) as f64);
    let llama_best_top1 = llama.top1_agree.max(llama_batch_top1);

    if exact.max_rel_l2 > EXACT_MAX_REL_L2 {
        failures.push(format!("exact path: max rel-L2 {:.2e} > {EXACT_MAX_REL_L2:.0e}", exact.max_rel_l2));
    }
    if exact.argmax_mismatch_clear > 0 {
        failures.push(format!(
            "exact path: argmax differs from the truth at {} positions whose top-2 gap ≥ {NEAR_TIE_GAP}",
            exact.argmax_mismatch_clear
        ));
    }
    for (label, stats) in [("default path (batch)", &default), ("default path (one token per call)", &step)] {
        if stats.mean_kl > llama_best_kl {
            failures.push(format!("{label}: mean KL {:.3e} > llama.cpp's {:.3e}", stats.mean_kl, llama_best_kl));
        }
        if stats.top1_agree < llama_best_top1 {
            failures.push(format!(
                "{label}: top-1 agreement {}/{} < llama.cpp's {}",
                stats.top1_agree, stats.positions, llama_best_top1
            ));
        }
    }
    Ok(ModelReport {
        model: fixture.model.clone(),
        cases: fixture.cases.len(),
        exact,
        default,
        default_step: step,
        llamacpp: llama,
        llamacpp_best_mean_kl: llama_best_kl,
        llamacpp_best_top1: llama_best_top1,
        failures,
    })
}

/// Every `*.json` fixture in `dir`, sorted by name.
pub fn fixture_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    Ok(v)
}

/// Where the model file a fixture names lives: beside the fixtures' `models/synth`, or the default
/// model (fetched if needed) for SmolLM2.
pub fn resolve_model(fixture_dir: &Path, model_file: &str, fetch: bool) -> Result<Option<PathBuf>> {
    let synth = fixture_dir.join("../../models/synth").join(model_file);
    if synth.is_file() {
        return Ok(Some(synth));
    }
    if let Some(known) = crate::default_model::known(model_file) {
        if let Some(p) = known.cached_path() {
            return Ok(Some(p));
        }
        if fetch {
            return known.ensure().map(Some);
        }
    }
    Ok(None)
}

/// Markdown table of reports.
pub fn render_table(reports: &[ModelReport]) -> String {
    let mut s = String::new();
    s.push_str("| model | positions | exact max rel-L2 | exact top-1 | default mean KL (batch / per token) | default max rel-L2 | default top-1 (batch / per token) | llama.cpp mean KL | llama.cpp max rel-L2 | llama.cpp top-1 | result |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {:.1e} | {} | {:.1e} / {:.1e} | {:.1e} | {} / {} | {:.2e} | {:.2} | {} | {} |\n",
            r.model.trim_end_matches(".gguf"),
            r.default.positions,
            r.exact.max_rel_l2,
            r.exact.top1_agree,
            r.default.mean_kl,
            r.default_step.mean_kl,
            r.default.max_rel_l2.max(r.default_step.max_rel_l2),
            r.default.top1_agree,
            r.default_step.top1_agree,
            r.llamacpp.mean_kl,
            r.llamacpp.max_rel_l2,
            r.llamacpp.top1_agree,
            if r.passed() { "pass" } else { "FAIL" }
        ));
    }
    s
}
