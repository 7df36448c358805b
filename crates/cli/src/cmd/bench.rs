//! `kiln bench`: llama-bench's tests. pp N = tokens/s processing an N-token prompt in one batch
//! from an empty cache; tg N = tokens/s generating N tokens one at a time from an empty cache.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_engine::{Model, Session, WeightPages};
use kiln_model::{Logits, Precision};

use crate::cmd::parity::Backend;
use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Prompt length of the pp test (0: skip it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens of the tg test (0: skip it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test.
    #[arg(short, long, default_value_t = 3)]
    pub repetitions: usize,
    /// Read the weights from the file's memory map instead of a private copy on 2 MiB pages
    /// (quicker start, pages shared with other processes; slower generation: the Q4_0/Q4_K/Q5_K
    /// matrices stay in the file's row layout, not interleaved for the eight-row kernels).
    #[arg(long)]
    pub mmap: bool,
    /// Threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Benchmark the exact reference path instead of the default one.
    #[arg(long)]
    pub exact: bool,
    /// One JSON object per test instead of the markdown table.
    #[arg(long)]
    pub json: bool,
    /// Where the forward pass runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

/// A sequence on the chosen backend.
enum Runner<'m> {
    Cpu(Session<'m>),
    #[cfg(feature = "cuda")]
    Cuda(kiln_cuda::CudaSession<'m>),
}

impl Runner<'_> {
    fn reset(&mut self) {
        match self {
            Runner::Cpu(s) => s.reset(),
            #[cfg(feature = "cuda")]
            Runner::Cuda(s) => s.reset(),
        }
    }

    fn eval(&mut self, tokens: &[u32]) -> Result<()> {
        match self {
            Runner::Cpu(s) => s.eval(tokens, Logits::Last).map(|_| ()),
            #[cfg(feature = "cuda")]
            Runner::Cuda(s) => s.eval(tokens, Logits::Last).map(|_| ()),
        }
    }
}

#[derive(serde::Serialize)]
struct TestResult {
    model: String,
    size_bytes: u64,
    params: u64,
    path: &'static str,
    threads: usize,
    test: String,
    n_tokens: usize,
    samples_ts: Vec<f64>,
    avg_ts: f64,
    stddev_ts: f64,
}

pub fn main(a: Args) -> Result<ExitCode> {
    if a.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    if a.n_prompt == 0 && a.n_gen == 0 {
        bail!("nothing to run: -p and -n are both 0");
    }
    common::set_threads(a.threads)?;
    a.backend.check()?;
    if a.exact && a.backend != Backend::Cpu {
        bail!("--exact runs on the CPU only");
    }
    let threads = rayon::current_num_threads();
    // The GPU path uploads the weights: a host copy on huge pages would only slow the load.
    let pages = if a.backend == Backend::Cpu { common::cpu_weight_pages(a.mmap) } else { WeightPages::Mapped };
    let model = common::load_model_opts(&a.model, pages, &a.load)?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let n_ctx = a.n_prompt.max(a.n_gen).max(1);
    let flag = format!("-p {} -n {}", a.n_prompt, a.n_gen);
    // The prompt's token ids are held too (4 bytes each); the CPU's KV cache is checked below.
    common::check_memory(&flag, "the prompt's tokens", (a.n_prompt as u64).checked_mul(4))?;
    #[cfg(feature = "cuda")]
    let gpu = match a.backend {
        Backend::Cuda => {
            let dev = kiln_cuda::Device::open(0)?;
            eprintln!(
                "kiln: CUDA device {} (sm_{}{}), kernels compiled in {:.0} ms, cuBLAS {}",
                dev.name,
                dev.capability.0,
                dev.capability.1,
                dev.compile_ms,
                if dev.has_cublas() { "found" } else { "missing (batches run through the mat-vec kernels)" }
            );
            Some(kiln_cuda::CudaModel::upload(dev, &model.weights)?)
        }
        Backend::Cpu => None,
    };
    #[cfg(feature = "cuda")]
    let mut session = match &gpu {
        Some(g) => Runner::Cuda(kiln_cuda::CudaSession::new(g, n_ctx)?),
        None => Runner::Cpu(common::session(&model, n_ctx, precision, &flag)?),
    };
    #[cfg(not(feature = "cuda"))]
    let mut session = Runner::Cpu(common::session(&model, n_ctx, precision, &flag)?);
    // Token ids spread over the vocabulary, skipping the first ones (often control tokens).
    let n_vocab = model.weights.cfg.n_vocab as u32;
    let token = |i: usize| 3 + (i as u32 * 7919) % (n_vocab - 3);

    let mut results = Vec::new();
    if a.n_prompt > 0 {
        let prompt: Vec<u32> = (0..a.n_prompt).map(token).collect();
        session.reset();
        session.eval(&prompt[..a.n_prompt.min(16)])?; // warm-up
        session.reset();
        session.eval(&prompt)?; // warm-up of the batched path (cuBLAS picks its kernels here)
        let samples = repeat(a.repetitions, || {
            session.reset();
            let t0 = Instant::now();
            session.eval(&prompt)?;
            Ok(a.n_prompt as f64 / t0.elapsed().as_secs_f64())
        })?;
        results.push(result(&model, &a, threads, format!("pp{}", a.n_prompt), a.n_prompt, samples));
    }
    if a.n_gen > 0 {
        session.reset();
        session.eval(&[token(0)])?; // warm-up: loads the kernels…
        session.eval(&[token(1)])?; // …and captures the CUDA graph
        let samples = repeat(a.repetitions, || {
            session.reset();
            let t0 = Instant::now();
            for i in 0..a.n_gen {
                session.eval(&[token(i)])?;
            }
            Ok(a.n_gen as f64 / t0.elapsed().as_secs_f64())
        })?;
        results.push(result(&model, &a, threads, format!("tg{}", a.n_gen), a.n_gen, samples));
    }

    if a.backend == Backend::Cuda {
        let bpt = model.weights.bytes_per_token();
        for r in results.iter().filter(|r| r.test.starts_with("tg")) {
            eprintln!(
                "kiln: {}: {:.1} MB of weights per token x {:.1} t/s = {:.0} GB/s = {:.1}% of 3.35 TB/s",
                r.test,
                bpt as f64 / 1e6,
                r.avg_ts,
                bpt as f64 * r.avg_ts / 1e9,
                100.0 * bpt as f64 * r.avg_ts / 3.35e12
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("| model | size | params | path | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
        for r in &results {
            println!(
                "| {} | {:.2} MiB | {:.2} M | {} | {} | {} | {:.2} ± {:.2} |",
                r.model,
                r.size_bytes as f64 / (1024.0 * 1024.0),
                r.params as f64 / 1e6,
                r.path,
                r.threads,
                r.test,
                r.avg_ts,
                r.stddev_ts
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn repeat(n: usize, mut f: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    (0..n).map(|_| f()).collect()
}

fn result(model: &Model, a: &Args, threads: usize, test: String, n_tokens: usize, samples: Vec<f64>) -> TestResult {
    let n = samples.len() as f64;
    let avg = samples.iter().sum::<f64>() / n;
    let var =
        if samples.len() > 1 { samples.iter().map(|s| (s - avg) * (s - avg)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    let g = model.gguf;
    TestResult {
        model: model.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        size_bytes: g.tensors.iter().map(|t| t.n_bytes).sum(),
        params: g.tensors.iter().map(|t| t.n_elements).sum(),
        path: match (a.backend, a.exact) {
            (Backend::Cuda, _) => "cuda",
            (Backend::Cpu, true) => "exact",
            (Backend::Cpu, false) => "default",
        },
        threads,
        test,
        n_tokens,
        samples_ts: samples,
        avg_ts: avg,
        stddev_ts: var.sqrt(),
    }
}
