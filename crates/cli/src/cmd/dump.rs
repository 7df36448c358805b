//! `kiln dump`: every named activation of one forward pass, as `.npy` files with an index, or as a
//! statistics table.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use kiln_engine::diagnose::{self, dumpdir, Filter};
use kiln_model::{Fault, Precision};

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Token ids, comma-separated.
    #[arg(long, required = true)]
    pub tokens: String,
    /// Only these layers' activations (comma-separated); token_embd, output_norm and logits stay.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Only these ops (comma-separated), e.g. q_rope,kq_soft_max,logits.
    #[arg(long, value_delimiter = ',')]
    pub ops: Option<Vec<String>>,
    /// Write `NAME.npy` per activation and `index.json` into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print RMS, mean, min, max and NaN/Inf counts per activation.
    #[arg(long)]
    pub stats: bool,
    /// Dump the exact reference path instead of the default one.
    #[arg(long)]
    pub exact: bool,
    /// Testing only: run with a deliberate bug.
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

pub fn main(a: Args) -> Result<ExitCode> {
    if a.out.is_none() && !a.stats {
        anyhow::bail!("nothing to do: give --out DIR, --stats, or both");
    }
    common::set_threads(a.threads)?;
    let tokens = common::parse_tokens(&a.tokens)?;
    let fault = a.inject_fault.as_deref().map(str::parse::<Fault>).transpose().map_err(anyhow::Error::msg)?;
    let model = common::load_model(&a.model, &a.load)?;
    common::check_tokens(&model, &tokens)?;
    check_capture_memory(&model, &tokens, 1)?;
    let filter = Filter::new(model.weights.cfg.n_layer, a.layers.as_deref(), a.ops.as_deref())?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let tensors = diagnose::capture(&model, &tokens, precision, fault, filter)?;
    if a.stats {
        print!("{}", diagnose::capture::render_stats(&tensors));
    }
    if let Some(dir) = &a.out {
        let model_name = model.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        dumpdir::write(dir, &model_name, if a.exact { "exact" } else { "default" }, &tokens, &tensors)?;
        eprintln!("kiln: wrote {} activations to {}", tensors.len(), dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks that `copies` captures of every activation of a pass over `tokens` fit in memory: the KV
/// cache, all positions' logits, and the activations kept, dominated for long inputs by the
/// attention weights (`n_layer × n_head × n²`) and otherwise ~`n × (8·n_embd + 3·n_ff + 4·q_dim)`
/// f32 per layer.
pub fn check_capture_memory(model: &kiln_engine::Model, tokens: &[u32], copies: u64) -> Result<()> {
    let cfg = &model.weights.cfg;
    let n = tokens.len() as u64;
    let per_layer = || {
        let weights = n.checked_mul(n)?.checked_mul(cfg.n_head as u64)?;
        let rows = n.checked_mul(8 * cfg.n_embd as u64 + 3 * cfg.n_ff as u64 + 4 * cfg.q_dim() as u64)?;
        weights.checked_add(rows)?.checked_mul(4)
    };
    let activations = per_layer().and_then(|b| b.checked_mul(cfg.n_layer as u64)?.checked_mul(copies));
    common::check_pass_memory(model, tokens.len(), true, activations, &format!("--tokens ({n} tokens)"))
}
