//! `kiln perplexity`: perplexity over a text in non-overlapping chunks scored on their second
//! half (llama-perplexity's method); saving the scored logits, or KL divergence against saved ones.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_engine::diagnose::ppl::{self, Chunk, LogitsHeader, LogitsReader, LogitsWriter};
use kiln_model::Precision;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// UTF-8 text file to score.
    #[arg(short = 'f', long = "file", conflicts_with = "tokens_file")]
    pub file: Option<PathBuf>,
    /// Instead of a text: one token sequence per line (ids separated by commas or spaces), each
    /// run from an empty cache and scored at every position.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (0: all).
    #[arg(long, default_value_t = 0)]
    pub chunks: usize,
    /// Store the scored positions' logits (f32) for a later --kl-base.
    #[arg(long)]
    pub save_logits: Option<PathBuf>,
    /// KL divergence of this run from logits saved by --save-logits.
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    /// Use the exact reference path.
    #[arg(long)]
    pub exact: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read the weights from the file's memory map instead of a private copy on 2 MiB pages
    /// (quicker start, pages shared with other processes; slower generation: the Q4_0/Q4_K/Q5_K
    /// matrices stay in the file's row layout, not interleaved for the eight-row kernels).
    #[arg(long)]
    pub mmap: bool,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub backend: common::BackendArgs,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

#[derive(serde::Serialize)]
struct Output {
    model: String,
    path: &'static str,
    chunks: usize,
    scored_positions: usize,
    predicted_tokens: usize,
    perplexity: f64,
    perplexity_stderr: f64,
    mean_nll: f64,
    kl: Option<ppl::KlStats>,
}

pub fn main(a: Args) -> Result<ExitCode> {
    common::set_threads(a.threads)?;
    let (model, gpu) = a
        .backend
        .load(&a.model, a.mmap, &a.load, a.exact, |m| kiln_engine::GpuModel::session_bytes(&m.weights.cfg, a.ctx))?;
    let n_ctx_train = model.weights.cfg.n_ctx_train;
    if a.file.is_some() && n_ctx_train > 0 && a.ctx > n_ctx_train {
        bail!("--ctx {} is longer than the model's training context ({n_ctx_train})", a.ctx);
    }
    let chunks = match (&a.file, &a.tokens_file) {
        (Some(f), None) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!("{} is not valid UTF-8 (byte {})", f.display(), e.utf8_error().valid_up_to())
            })?;
            let tok = &model.tokenizer;
            let tokens = tok.encode(&text, true, false)?;
            let bos = if tok.add_bos() { tok.bos() } else { None };
            ppl::text_chunks(&tokens, a.ctx, bos, a.chunks).with_context(|| format!("{}", f.display()))?
        }
        (None, Some(f)) => read_token_lines(f, a.chunks)?,
        _ => bail!("give a text with -f FILE (or token sequences with --tokens-file FILE)"),
    };
    for c in &chunks {
        common::check_tokens(&model, &c.tokens)?;
    }
    // Each chunk runs in one call with every position's logits, from one cache of the longest.
    let longest = chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(0);
    let flag = match a.tokens_file {
        Some(_) => format!("the longest token sequence ({longest} tokens)"),
        None => format!("--ctx {}", a.ctx),
    };
    common::check_pass_memory(&model, longest, true, Some(0), &flag)?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let path_name = if a.exact { "exact" } else { "default" };
    let model_name = model.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let n_vocab = model.weights.cfg.n_vocab;
    let base = a.kl_base.as_deref().map(LogitsReader::open).transpose()?;
    if let Some(b) = &base {
        // Checked before any work, so a wrong file fails at once.
        b.check_matches(n_vocab, &chunks)?;
    }
    let base_desc = base.as_ref().map(|b| format!("{} ({} path)", b.header.model, b.header.precision));
    let save = match &a.save_logits {
        Some(p) => {
            let header = LogitsHeader {
                model: model_name.clone(),
                precision: path_name.into(),
                n_vocab,
                chunks: chunks.clone(),
            };
            Some(LogitsWriter::create(p, &header)?)
        }
        None => None,
    };
    let bar = indicatif::ProgressBar::new(chunks.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] chunk {pos}/{len} {msg} (eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let result = ppl::run(&model, &chunks, precision, gpu.as_ref(), save, base, |done, nll| {
        if nll.n > 0 {
            bar.set_message(format!("ppl {:.4}", nll.perplexity().0));
        }
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let result = result?;
    if result.nll.n == 0 && result.kl.is_none() {
        bail!("no position has a next token to score");
    }
    let (ppl_v, ppl_se) = if result.nll.n > 0 { result.nll.perplexity() } else { (f64::NAN, f64::NAN) };
    let out = Output {
        model: model_name,
        path: path_name,
        chunks: chunks.len(),
        scored_positions: chunks.iter().map(Chunk::n_scored).sum(),
        predicted_tokens: result.nll.n,
        perplexity: ppl_v,
        perplexity_stderr: ppl_se,
        mean_nll: result.nll.sum / result.nll.n.max(1) as f64,
        kl: result.kl,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} ({} path): {} chunks, {} predicted tokens, {} scored positions",
            out.model, out.path, out.chunks, out.predicted_tokens, out.scored_positions
        );
        println!("perplexity: {:.4} ± {:.4}", out.perplexity, out.perplexity_stderr);
        if let (Some(k), Some(b)) = (&out.kl, &base_desc) {
            println!("KL divergence from {b} (nats, {} positions):", k.positions);
            println!("  mean    {:.4e} ± {:.2e} (95% CI)", k.mean, k.mean_ci95);
            println!("  median  {:.4e}", k.median);
            println!("  p99     {:.4e}", k.p99);
            println!("  max     {:.4e}", k.max);
            println!(
                "  top-1 agreement {:.3}% (95% CI {:.3}%–{:.3}%)",
                100.0 * k.top1,
                100.0 * k.top1_ci95.0,
                100.0 * k.top1_ci95.1
            );
        }
    }
    if let Some(p) = &a.save_logits {
        eprintln!("kiln: saved the logits of {} positions to {}", out.scored_positions, p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One sequence per non-empty line, scored at every position.
fn read_token_lines(path: &std::path::Path, max: usize) -> Result<Vec<Chunk>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut chunks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let tokens = common::parse_tokens(line).with_context(|| format!("{} line {}", path.display(), i + 1))?;
        chunks.push(Chunk::all_positions(tokens));
        if max > 0 && chunks.len() == max {
            break;
        }
    }
    if chunks.is_empty() {
        bail!("{} holds no token sequences", path.display());
    }
    Ok(chunks)
}
