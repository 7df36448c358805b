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
    /// Seconds a client has to send a request's headers (from connecting, or from the first byte
    /// of a later request on a kept-alive connection); slower ones are disconnected.
    #[arg(long, default_value_t = kiln_server::HEADER_TIMEOUT.as_secs_f64())]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body after its headers; slower ones get 408.
    #[arg(long, default_value_t = kiln_server::BODY_TIMEOUT.as_secs_f64())]
    pub body_timeout: f64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, default_value_t = kiln_server::IDLE_TIMEOUT.as_secs_f64())]
    pub idle_timeout: f64,
    /// Longest a request may run, in seconds (default: no limit); past it a streamed answer ends
    /// with an error event, a non-streamed one gets 504.
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// Most open connections; past it a new connection gets 503 with Retry-After and is closed
    /// (default: the open-file limit less 64, at most 1024).
    #[arg(long)]
    pub max_connections: Option<usize>,
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
    /// Speculative decoding of requests that do not set their own (`"speculative": {"mode",
    /// "draft_max"}` or llama.cpp's `"speculative.n_max"` in the body).
    #[command(flatten)]
    pub spec: common::SpecArgs,
    #[command(flatten)]
    pub backend: common::BackendArgs,
    /// GPU memory for the paged KV cache, e.g. `8G`, `512M` or bytes (default: what is free
    /// after the weights and work buffers, less a margin).
    #[arg(long, value_name = "SIZE")]
    pub kv_memory: Option<String>,
    #[command(flatten)]
    pub load: common::LoadArgs,
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
    let grace = seconds("--grace", a.grace, true)?;
    let header_timeout = seconds("--header-timeout", a.header_timeout, false)?;
    let body_timeout = seconds("--body-timeout", a.body_timeout, false)?;
    let idle_timeout = seconds("--idle-timeout", a.idle_timeout, false)?;
    let request_timeout = a.request_timeout.map(|t| seconds("--request-timeout", t, false)).transpose()?;
    if a.max_connections == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key is empty");
    }
    a.template.check()?;
    let spec = a.spec.options()?;
    common::set_threads(a.threads)?;
    let kv_memory = a.kv_memory.as_deref().map(parse_size).transpose()?;
    let pages = common::cpu_weight_pages(a.mmap);
    let (mut model, mut gpu) = a.backend.load(&a.model, a.mmap, &a.load, a.exact, |m| {
        let ctx = a.ctx.unwrap_or_else(|| m.default_ctx());
        let kv = kv_memory.unwrap_or(0);
        kiln_engine::GpuModel::serving_bytes(&m.weights.cfg, a.parallel, ctx).max(kv)
    })?;
    if let Some(g) = gpu.as_mut() {
        let rows = if g.serve_rows_for_slots(a.parallel) { "tensor cores" } else { "CUDA cores" };
        eprintln!("kiln: {} sequences per step: generation rows on the {rows}", a.parallel);
    }
    if gpu.is_none() && kv_memory.is_some() {
        bail!("--kv-memory sizes the GPU's KV cache, and the server runs on the CPU (each slot there has its own cache of --ctx positions)");
    }
    let draft = a.spec.load_draft(&model, pages, &a.load)?;
    // The server renders chat requests with `model.template`; without one it writes the messages
    // as a plain `role: content` transcript.
    a.template.apply(&mut model, "chat messages go in")?;
    let mut cfg = kiln_server::Config::new(&model);
    cfg.host = a.host;
    cfg.spec = spec;
    cfg.draft = draft.map(|d| kiln_server::DraftModelFile(std::sync::Arc::new(d)));
    cfg.port = a.port;
    cfg.parallel = a.parallel;
    if let Some(c) = a.ctx {
        cfg.ctx = c;
    }
    cfg.queue = a.queue;
    cfg.api_key = a.api_key;
    cfg.grace = grace;
    cfg.header_timeout = header_timeout;
    cfg.body_timeout = body_timeout;
    cfg.idle_timeout = idle_timeout;
    cfg.request_timeout = request_timeout;
    if let Some(n) = a.max_connections {
        cfg.max_connections = n;
    }
    cfg.precision = if a.exact { Precision::Exact } else { Precision::Fast };
    cfg.gpu = gpu.map(std::sync::Arc::new);
    cfg.kv_memory = kv_memory;
    kiln_server::run_blocking(model, cfg)?;
    Ok(ExitCode::SUCCESS)
}

/// `--kv-memory`: bytes, or a number with K, M, G or T (binary units, `GiB`/`GB` spellings too).
fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let digits = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches('B').trim_end_matches('I') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("--kv-memory {s:?}: give bytes or a size like 8G or 512M"),
    };
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("--kv-memory {s:?}: give bytes or a size like 8G or 512M"))?;
    let bytes = v * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        bail!("--kv-memory {s:?}: the size must be at least 1 byte and fit in memory addresses");
    }
    Ok(bytes as usize)
}

/// A flag's number of seconds as a Duration: finite, not negative (nor 0 unless `zero_ok`), and
/// small enough to represent.
fn seconds(flag: &str, v: f64, zero_ok: bool) -> Result<Duration> {
    let ok = v.is_finite() && if zero_ok { v >= 0.0 } else { v > 0.0 };
    match Duration::try_from_secs_f64(v) {
        Ok(d) if ok => Ok(d),
        _ => bail!(
            "{flag} must be a number of seconds {} (at most about 1.8e19), got {v:?}",
            if zero_ok { "≥ 0" } else { "> 0" }
        ),
    }
}
