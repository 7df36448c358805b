//! Perplexity over chunks of a token stream (llama-perplexity's method) and KL divergence against
//! logits saved from another run.
//!
//! Chunks: the text's tokens are cut into non-overlapping chunks of `ctx` tokens; the first token
//! of each is replaced by BOS (when the model uses one), each chunk runs from an empty cache, and
//! only its second half is scored (positions `ctx/2 .. ctx-1`, each predicting the next token),
//! so every scored token has at least `ctx/2` tokens of context. Alternatively, explicit token
//! sequences can be scored at every position (the parity fixtures' view).
//!
//! Logits file: `KILNLGT1`, a u64 little-endian header length, a JSON header ([`LogitsHeader`]),
//! then f32 little-endian logits `[n_vocab]` for each scored position, chunk by chunk. Only the
//! scored positions are stored, in f32 because the KL values measured here go down to 1e-13.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::parity::log_softmax;

/// One sequence run from an empty cache; the logits of positions `first..end` are scored (their
/// NLL where a next token exists, their KL divergence everywhere).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub tokens: Vec<u32>,
    pub first: usize,
    pub end: usize,
}

impl Chunk {
    pub fn n_scored(&self) -> usize {
        self.end - self.first
    }

    /// A whole sequence scored at every position (the parity fixtures' view).
    pub fn all_positions(tokens: Vec<u32>) -> Chunk {
        let end = tokens.len();
        Chunk { tokens, first: 0, end }
    }
}

/// llama-perplexity's chunks: `max_chunks` (0: all) non-overlapping chunks of `ctx` tokens, BOS
/// first, second half scored.
pub fn text_chunks(tokens: &[u32], ctx: usize, bos: Option<u32>, max_chunks: usize) -> Result<Vec<Chunk>> {
    if ctx < 4 {
        bail!("--ctx {ctx} is too small (at least 4)");
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        bail!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}: use a longer text or a smaller --ctx",
            tokens.len()
        );
    }
    let n = if max_chunks == 0 { available } else { available.min(max_chunks) };
    Ok(tokens
        .chunks_exact(ctx)
        .take(n)
        .map(|c| {
            let mut t = c.to_vec();
            if let Some(b) = bos {
                t[0] = b;
            }
            // Positions ctx/2 .. ctx-2 predict tokens inside the chunk (llama-perplexity's range).
            Chunk { tokens: t, first: ctx / 2, end: ctx - 1 }
        })
        .collect())
}

/// Running sums of negative log-likelihoods.
#[derive(Clone, Copy, Debug, Default)]
pub struct Nll {
    pub sum: f64,
    pub sum_sq: f64,
    pub n: usize,
}

impl Nll {
    pub fn add(&mut self, logits: &[f32], next: u32) {
        let lp = log_softmax(logits);
        let nll = -lp[next as usize];
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.n += 1;
    }

    /// Perplexity and its standard error (delta method: `ppl × stderr(mean NLL)`, as llama.cpp).
    pub fn perplexity(&self) -> (f64, f64) {
        let n = self.n as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let se = if self.n > 1 { (var / (n - 1.0)).sqrt() } else { f64::NAN };
        let ppl = mean.exp();
        (ppl, ppl * se)
    }
}

/// KL(base ‖ this) per position, and whether the argmaxes agree.
#[derive(Clone, Debug, Default)]
pub struct KlAcc {
    pub kl: Vec<f64>,
    pub top1_agree: usize,
}

impl KlAcc {
    pub fn add(&mut self, base: &[f32], this: &[f32]) {
        self.kl.push(crate::parity::kl_divergence(base, this));
        if crate::sampler::argmax(base) == crate::sampler::argmax(this) {
            self.top1_agree += 1;
        }
    }

    pub fn summary(&self) -> KlStats {
        let n = self.kl.len();
        let nf = n as f64;
        let mean = self.kl.iter().sum::<f64>() / nf;
        let var = if n > 1 { self.kl.iter().map(|k| (k - mean) * (k - mean)).sum::<f64>() / (nf - 1.0) } else { 0.0 };
        let mut sorted = self.kl.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((p * (nf - 1.0)).round() as usize).min(n - 1)];
        let p = self.top1_agree as f64 / nf;
        KlStats {
            positions: n,
            mean,
            mean_ci95: Z95 * (var / nf).sqrt(),
            median: q(0.5),
            p99: q(0.99),
            max: sorted[n - 1],
            top1: p,
            top1_ci95: wilson(p, nf),
        }
    }
}

/// The two-sided 95% normal quantile.
const Z95: f64 = 1.959964;

/// Wilson score interval for a proportion: stays inside [0, 1] and is honest at p near 1, where
/// top-1 agreement usually sits (the normal approximation would give a zero-width interval).
fn wilson(p: f64, n: f64) -> (f64, f64) {
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[derive(Clone, Debug, Serialize)]
pub struct KlStats {
    pub positions: usize,
    pub mean: f64,
    /// Half-width of the 95% confidence interval of the mean (normal approximation).
    pub mean_ci95: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Fraction of positions where both argmaxes agree, with its 95% Wilson interval.
    pub top1: f64,
    pub top1_ci95: (f64, f64),
}

const MAGIC: &[u8; 8] = b"KILNLGT1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogitsHeader {
    /// File name of the model that produced the logits (informational: KL against another model
    /// of the same vocabulary is the point).
    pub model: String,
    pub precision: String,
    pub n_vocab: usize,
    pub chunks: Vec<Chunk>,
}

impl LogitsHeader {
    fn n_scored(&self) -> usize {
        self.chunks.iter().map(Chunk::n_scored).sum()
    }
}

pub struct LogitsWriter {
    out: BufWriter<File>,
}

impl LogitsWriter {
    pub fn create(path: &Path, header: &LogitsHeader) -> Result<LogitsWriter> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(f);
        let json = serde_json::to_vec(header)?;
        out.write_all(MAGIC)?;
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        Ok(LogitsWriter { out })
    }

    pub fn push(&mut self, logits: &[f32]) -> Result<()> {
        let mut buf = Vec::with_capacity(logits.len() * 4);
        for v in logits {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&buf).context("writing logits")
    }

    pub fn finish(mut self) -> Result<()> {
        self.out.flush().context("writing logits")
    }
}

pub struct LogitsReader {
    pub header: LogitsHeader,
    input: BufReader<File>,
    buf: Vec<u8>,
}

impl LogitsReader {
    pub fn open(path: &Path) -> Result<LogitsReader> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = f.metadata()?.len();
        let mut input = BufReader::new(f);
        let mut magic = [0u8; 8];
        let mut len = [0u8; 8];
        if input.read_exact(&mut magic).is_err() || &magic != MAGIC || input.read_exact(&mut len).is_err() {
            bail!("{} is not a kiln logits file (written by `kiln perplexity --save-logits`)", path.display());
        }
        let len = u64::from_le_bytes(len);
        if len > size {
            bail!("{}: truncated header", path.display());
        }
        let mut json = vec![0u8; len as usize];
        input.read_exact(&mut json).with_context(|| format!("{}: truncated header", path.display()))?;
        let header: LogitsHeader =
            serde_json::from_slice(&json).with_context(|| format!("{}: malformed header", path.display()))?;
        let want = 16 + len + (header.n_scored() * header.n_vocab * 4) as u64;
        if size != want {
            bail!("{}: {size} bytes, its header describes {want} (truncated or corrupt)", path.display());
        }
        Ok(LogitsReader { header, input, buf: Vec::new() })
    }

    /// Checks that this file scores the same tokens at the same positions with the same vocabulary.
    pub fn check_matches(&self, n_vocab: usize, chunks: &[Chunk]) -> Result<()> {
        let h = &self.header;
        if h.n_vocab != n_vocab {
            bail!(
                "the base logits have a vocabulary of {} (model {}), this model {n_vocab}: not comparable",
                h.n_vocab,
                h.model
            );
        }
        if h.chunks.len() != chunks.len() {
            bail!(
                "the base logits have {} chunks, this run {} (same text, --ctx and --chunks needed)",
                h.chunks.len(),
                chunks.len()
            );
        }
        for (i, (a, b)) in h.chunks.iter().zip(chunks).enumerate() {
            if a != b {
                let pos = a.tokens.iter().zip(&b.tokens).position(|(x, y)| x != y);
                let detail = match pos {
                    Some(p) => format!("token {p} is {} there, {} here", a.tokens[p], b.tokens[p]),
                    None => format!(
                        "{} vs {} tokens, scored {}..{} vs {}..{}",
                        a.tokens.len(),
                        b.tokens.len(),
                        a.first,
                        a.end,
                        b.first,
                        b.end
                    ),
                };
                bail!(
                    "the base logits were computed on different tokens (chunk {i}: {detail}; base model {}): \
                     same text, tokenizer and --ctx needed",
                    h.model
                );
            }
        }
        Ok(())
    }

    pub fn next_row(&mut self) -> Result<Vec<f32>> {
        self.buf.resize(self.header.n_vocab * 4, 0);
        self.input.read_exact(&mut self.buf).context("reading base logits")?;
        Ok(self.buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// What a perplexity run measured.
#[derive(Clone, Debug)]
pub struct PplResult {
    pub nll: Nll,
    pub kl: Option<KlStats>,
}

/// Runs every chunk (each in one call from an empty cache), accumulates the NLL of the scored
/// positions, writes their logits to `save` and compares them with `base`. `progress(done)` is
/// called after each chunk.
pub fn run(
    model: &crate::Model,
    chunks: &[Chunk],
    precision: kiln_model::Precision,
    gpu: Option<&crate::GpuModel>,
    mut save: Option<LogitsWriter>,
    mut base: Option<LogitsReader>,
    mut progress: impl FnMut(usize, &Nll),
) -> Result<PplResult> {
    let n_vocab = model.weights.cfg.n_vocab;
    if let Some(b) = &base {
        b.check_matches(n_vocab, chunks)?;
    }
    let longest = chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(0);
    let mut session = match gpu {
        Some(g) => crate::Session::on_gpu(model, longest, g)?,
        None => crate::Session::new(model, longest, precision),
    };
    let mut nll = Nll::default();
    let mut kl = KlAcc::default();
    for (i, c) in chunks.iter().enumerate() {
        session.reset();
        let logits = session.eval(&c.tokens, kiln_model::Logits::All)?;
        for j in c.first..c.end {
            let lj = &logits[j * n_vocab..(j + 1) * n_vocab];
            if let Some(&next) = c.tokens.get(j + 1) {
                nll.add(lj, next);
            }
            if let Some(w) = save.as_mut() {
                w.push(lj)?;
            }
            if let Some(b) = base.as_mut() {
                kl.add(&b.next_row()?, lj);
            }
        }
        progress(i + 1, &nll);
    }
    if let Some(w) = save {
        w.finish()?;
    }
    Ok(PplResult { nll, kl: base.map(|_| kl.summary()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_like_llama_perplexity() {
        let toks: Vec<u32> = (10..30).collect();
        let c = text_chunks(&toks, 8, Some(1), 0).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].tokens, vec![1, 19, 20, 21, 22, 23, 24, 25]);
        assert_eq!((c[1].first, c[1].end, c[1].n_scored()), (4, 7, 3));
        assert_eq!(text_chunks(&toks, 8, None, 1).unwrap().len(), 1);
        let e = text_chunks(&toks, 32, Some(1), 0).unwrap_err().to_string();
        assert!(e.contains("20 tokens") && e.contains("--ctx 32"), "{e}");
    }

    #[test]
    fn perplexity_of_uniform_logits_is_vocab_size() {
        let mut n = Nll::default();
        for t in 0..4 {
            n.add(&[0.0; 8], t);
        }
        let (ppl, se) = n.perplexity();
        assert!((ppl - 8.0).abs() < 1e-9 && se.abs() < 1e-9, "{ppl} {se}");
    }

    #[test]
    fn kl_summary_statistics() {
        let mut k = KlAcc::default();
        k.add(&[0.0, 1.0], &[0.0, 1.0]);
        k.add(&[1.0, 0.0], &[0.0, 1.0]);
        let s = k.summary();
        assert_eq!(s.positions, 2);
        assert!(s.max > 0.4 && s.median <= s.max);
        assert_eq!(s.top1, 0.5);
        assert!(s.top1_ci95.0 < 0.5 && s.top1_ci95.1 > 0.5);
    }
}
