use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_model::{Logits, Precision};

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Token ids, comma-separated.
    #[arg(long, required = true)]
    pub tokens: String,
    /// Write every position's logits as little-endian f32 [n_tokens, n_vocab].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub exact: bool,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub backend: common::BackendArgs,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

pub fn main(a: Args) -> Result<ExitCode> {
    common::set_threads(a.threads)?;
    let tokens = common::parse_tokens(&a.tokens)?;
    let n = tokens.len();
    let (model, gpu) = a
        .backend
        .load(&a.model, false, &a.load, a.exact, |m| kiln_engine::GpuModel::session_bytes(&m.weights.cfg, n))?;
    common::check_tokens(&model, &tokens)?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let flag = format!("--tokens ({} tokens)", tokens.len());
    common::check_pass_memory(&model, tokens.len(), true, Some(0), &flag)?;
    let mut s = common::session_on(&model, gpu.as_ref(), tokens.len(), precision, &flag)?;
    let logits = s.eval(&tokens, Logits::All)?;
    let n_vocab = model.weights.cfg.n_vocab;
    match &a.out {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            for v in &logits {
                f.write_all(&v.to_le_bytes())?;
            }
            f.flush()?;
            eprintln!("kiln: wrote [{}, {n_vocab}] f32 logits to {}", tokens.len(), path.display());
        }
        None => {
            let last = &logits[(tokens.len() - 1) * n_vocab..];
            let mut idx: Vec<usize> = (0..n_vocab).collect();
            idx.sort_by(|&x, &y| last[y].total_cmp(&last[x]));
            println!("top-10 logits at position {}:", tokens.len() - 1);
            for &i in idx.iter().take(10) {
                let piece = model.tokenizer.token_to_piece(i as u32).unwrap_or_default();
                println!("{i:>8}  {:>12.6}  {:?}", last[i], String::from_utf8_lossy(&piece));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
