//! `kiln serve`: the OpenAI-compatible HTTP server (crates/server).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use kiln_model::Precision;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Address to listen on; the default accepts local connections only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together, each with its own KV cache slot.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context size of each slot in tokens (default: the model's, capped at 4096).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait for a slot; beyond that new ones get 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Seconds running requests may go on after Ctrl-C / SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,
    /// Read the weights from the file's memory map instead of a private copy on 2 MiB pages
    /// (quicker start, pages shared with other processes; slower generation: the Q4_0/Q4_K/Q5_K
    /// matrices stay in the file's row layout, not interleaved for the eight-row kernels).
    #[arg(long)]
    pub mmap: bool,
    /// Threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Use the exact reference path (f64 sums) instead of the default fast path.
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub template: common::TemplateArgs,
}

pub fn main(a: Args) -> Result<ExitCode> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if a.ctx.is_some_and(|c| c < 2) {
        bail!("--ctx must be at least 2");
    }
    if !(a.grace.is_finite() && a.grace >= 0.0) {
        bail!("--grace must be a number of seconds ≥ 0");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key is empty");
    }
    a.template.check()?;
    common::set_threads(a.threads)?;
    let mut model = common::load_model_with(&a.model, common::cpu_weight_pages(a.mmap))?;
    // The server renders chat requests with `model.template`; without one it writes the messages
    // as a plain `role: content` transcript.
    a.template.apply(&mut model, "chat messages go in")?;
    let mut cfg = kiln_server::Config::new(&model);
    cfg.host = a.host;
    cfg.port = a.port;
    cfg.parallel = a.parallel;
    if let Some(c) = a.ctx {
        cfg.ctx = c;
    }
    cfg.queue = a.queue;
    cfg.api_key = a.api_key;
    cfg.grace = Duration::from_secs_f64(a.grace);
    cfg.precision = if a.exact { Precision::Exact } else { Precision::Fast };
    kiln_server::run_blocking(model, cfg)?;
    Ok(ExitCode::SUCCESS)
}
