//! `kiln-dynamo`: kiln as an NVIDIA Dynamo backend worker.
//!
//! The worker registers a GGUF model with Dynamo's discovery (etcd, or a shared directory with
//! `--discovery-backend file`), serves pre-tokenized requests from the Dynamo frontend with kiln's
//! continuous-batching scheduler (CPU or CUDA), and publishes the blocks its KV caches hold so the
//! frontend's KV-aware router sends each request to the worker that already holds its prefix.
//!
//! The frontend tokenizes and templates requests itself: the worker writes the files it needs
//! (`tokenizer.json`, `tokenizer_config.json`, `config.json`, `generation_config.json`) from the
//! GGUF file alone into `--model-dir` ([`kiln_engine::hf_files`]) and registers that directory.

mod engine;
mod kv;
mod request;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use dynamo_backend_common::{CommonArgs, WorkerConfig};

use crate::engine::{KilnEngine, Options};

#[derive(Parser, Debug)]
#[command(name = "kiln-dynamo", about = "kiln as an NVIDIA Dynamo backend worker (KV-aware routing)")]
struct Args {
    /// The GGUF model (default: kiln's default model, SmolLM2-135M-Instruct, fetched on first use).
    #[arg(short, long, env = "KILN_MODEL")]
    model: Option<PathBuf>,
    /// Where to write the Hugging Face files the frontend tokenizes with (default: a directory
    /// beside nothing else, under the system's temporary directory, named after the model file).
    /// The frontend must be able to read it (same machine or shared storage).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The model's name for clients (default: the GGUF file's name without `.gguf`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Context of each sequence, in tokens (default: the model's training context, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// Requests running or waiting at most; more are refused with an error.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Where the model runs: `cpu`, `cuda` (needs a build with `--features cuda`) or `auto`.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// GPU memory for the KV cache (e.g. `8GiB`); default: what is free after the weights.
    #[arg(long)]
    kv_memory: Option<String>,
    /// Speculative decoding: `ngram` (prompt lookup, kiln serve's default; greedy outputs are
    /// unchanged, sampled ones keep their distribution) or `off`.
    #[arg(long, default_value = "ngram")]
    spec: String,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.parallel == 0 || a.parallel > 1024 {
        bail!("--parallel must be between 1 and 1024, got {}", a.parallel);
    }
    let backend = match a.backend.as_str() {
        "cpu" => kiln_engine::Backend::Cpu,
        "cuda" => kiln_engine::Backend::Cuda,
        "auto" => kiln_engine::Backend::Auto,
        other => bail!("--backend must be cpu, cuda or auto, got '{other}'"),
    };
    let kv_memory = a.kv_memory.as_deref().map(parse_size).transpose()?;
    let spec = match a.spec.as_str() {
        "ngram" => kiln_engine::speculative::SpecOptions::default(),
        "off" => kiln_engine::speculative::SpecOptions::off(),
        other => bail!("--spec must be ngram or off, got '{other}'"),
    };
    let model = match &a.model {
        Some(m) => m.clone(),
        None => kiln_engine::default_model::ensure()?,
    };
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let served = a.served_model_name.clone().unwrap_or_else(|| stem.clone());
    let model_dir = a.model_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("kiln-dynamo").join(&stem));
    {
        let g = kiln_engine::Model::open_gguf(&model)?;
        kiln_engine::hf_files::write_hf_files(&g, &model, Some(&served), &model_dir)
            .with_context(|| format!("writing the frontend's files into {}", model_dir.display()))?;
    }
    let model_dir = model_dir.canonicalize().with_context(|| model_dir.display().to_string())?;
    let opts = Options {
        model,
        served_name: served.clone(),
        parallel: a.parallel,
        ctx: a.ctx,
        max_queue: a.max_queue.max(1),
        backend,
        kv_memory,
        spec,
    };
    let config = WorkerConfig {
        namespace: a.common.namespace,
        component: a.common.component,
        endpoint: a.common.endpoint,
        endpoint_types: a.common.endpoint_types,
        custom_jinja_template: a.common.custom_jinja_template,
        tool_call_parser: a.common.dyn_tool_call_parser,
        reasoning_parser: a.common.dyn_reasoning_parser,
        exclude_tools_when_tool_choice_none: a.common.exclude_tools_when_tool_choice_none,
        disaggregation_mode: a.common.disaggregation_mode,
        model_name: model_dir.to_string_lossy().into_owned(),
        served_model_name: Some(served),
        runtime: a.common.runtime,
        ..Default::default()
    };
    dynamo_backend_common::run(Arc::new(KilnEngine::new(opts)), config)
}

/// `8GiB`, `512MiB`, `1.5G`, `1000000`: bytes.
fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("--kv-memory: '{s}' is not a size such as 8GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("--kv-memory: unknown unit '{other}' in '{s}' (use B, KiB, MiB or GiB)"),
    };
    let bytes = n * mult;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < usize::MAX as f64) {
        bail!("--kv-memory: '{s}' is not a usable size");
    }
    Ok(bytes as usize)
}
