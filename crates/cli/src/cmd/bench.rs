//! `kiln bench`: llama-bench's tests. pp N = tokens/s processing an N-token prompt in one batch
//! from an empty cache; tg N = tokens/s generating N tokens one at a time from an empty cache.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_engine::{Model, Session};
use kiln_model::{Logits, Precision};

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
    /// Threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Benchmark the exact reference path instead of the default one.
    #[arg(long)]
    pub exact: bool,
    /// One JSON object per test instead of the markdown table.
    #[arg(long)]
    pub json: bool,
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
    let threads = rayon::current_num_threads();
    let model = common::load_model(&a.model)?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let n_ctx = a.n_prompt.max(a.n_gen).max(1);
    let mut session = Session::new(&model, n_ctx, precision);
    // Token ids spread over the vocabulary, skipping the first ones (often control tokens).
    let n_vocab = model.weights.cfg.n_vocab as u32;
    let token = |i: usize| 3 + (i as u32 * 7919) % (n_vocab - 3);

    let mut results = Vec::new();
    if a.n_prompt > 0 {
        let prompt: Vec<u32> = (0..a.n_prompt).map(token).collect();
        session.reset();
        session.eval(&prompt[..a.n_prompt.min(16)], Logits::Last)?; // warm-up
        let samples = repeat(a.repetitions, || {
            session.reset();
            let t0 = Instant::now();
            session.eval(&prompt, Logits::Last)?;
            Ok(a.n_prompt as f64 / t0.elapsed().as_secs_f64())
        })?;
        results.push(result(&model, &a, threads, format!("pp{}", a.n_prompt), a.n_prompt, samples));
    }
    if a.n_gen > 0 {
        session.reset();
        session.eval(&[token(0)], Logits::Last)?; // warm-up
        let samples = repeat(a.repetitions, || {
            session.reset();
            let t0 = Instant::now();
            for i in 0..a.n_gen {
                session.eval(&[token(i)], Logits::Last)?;
            }
            Ok(a.n_gen as f64 / t0.elapsed().as_secs_f64())
        })?;
        results.push(result(&model, &a, threads, format!("tg{}", a.n_gen), a.n_gen, samples));
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
        path: if a.exact { "exact" } else { "default" },
        threads,
        test,
        n_tokens,
        samples_ts: samples,
        avg_ts: avg,
        stddev_ts: var.sqrt(),
    }
}
