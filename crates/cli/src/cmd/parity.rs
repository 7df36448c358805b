use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_engine::parity;
use kiln_engine::Model;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    /// Fixture directory (default: ../shared/fixtures/parity).
    pub dir: Option<PathBuf>,
    /// Only fixtures whose file name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Where the default path runs (the exact reference always runs on the CPU).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// Run the default path split across N tensor-parallel ranks (threads of this process, each
    /// holding its share of the attention heads and FFN units, an all-reduce after each
    /// row-parallel product): what an N-GPU split computes. CPU only in this build.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tensor_parallel: u16,
}

/// The default path split across ranks ([`kiln_model::tensor_parallel`]): a fresh set of ranks
/// and caches per sequence.
struct TensorParallelDefault<'a> {
    weights: &'a kiln_model::ModelWeights<'a>,
    columns: &'a kiln_model::tensor_parallel::ColumnShards,
}

impl parity::DefaultPath for TensorParallelDefault<'_> {
    fn logits(&mut self, tokens: &[u32], per_token: bool) -> Result<Vec<f32>> {
        use kiln_model::{Logits, Precision};
        let mut tp = kiln_model::tensor_parallel::TensorParallel::new(self.weights, self.columns, tokens.len())?;
        if !per_token {
            return Ok(tp.eval(tokens, Precision::Fast, Logits::All)?);
        }
        let mut all = Vec::with_capacity(tokens.len() * self.weights.cfg.n_vocab);
        for t in tokens {
            all.extend(tp.eval(std::slice::from_ref(t), Precision::Fast, Logits::Last)?);
        }
        Ok(all)
    }
}

/// `--backend`: the CPU, or the CUDA backend (builds with `--features cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    /// Fails with one line when this build or machine cannot run the backend.
    pub fn check(self) -> Result<()> {
        match self {
            Backend::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda => kiln_cuda::probe().map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda => {
                anyhow::bail!("--backend cuda: this kiln was built without CUDA (rebuild with --features cuda)")
            }
        }
    }
}

/// The default path on the GPU: a fresh CUDA session per sequence for prompts; one-token steps
/// through the serving path too — [`BATCH_SEQUENCES`] sequences of the same tokens side by side
/// in each step over the paged KV cache — which must give every sequence the same bits. Where the
/// model's generation rows run on the tensor cores ([`kiln_cuda::CudaModel::serving_on_tensor_cores`])
/// the per-token logits reported are the serving path's (what `kiln serve` computes), else they
/// must also be the session's bits.
#[cfg(feature = "cuda")]
struct CudaDefault<'a>(&'a kiln_cuda::CudaModel);

/// Sequences run together in the batched one-token steps of `parity --backend cuda`.
#[cfg(feature = "cuda")]
const BATCH_SEQUENCES: usize = 3;

#[cfg(feature = "cuda")]
impl parity::DefaultPath for CudaDefault<'_> {
    fn logits(&mut self, tokens: &[u32], per_token: bool) -> Result<Vec<f32>> {
        use kiln_model::Logits;
        let mut s = kiln_cuda::CudaSession::new(self.0, tokens.len())?;
        if !per_token {
            return s.eval(tokens, Logits::All);
        }
        let tensor_cores = self.0.serving_on_tensor_cores();
        let mut session = Vec::with_capacity(tokens.len() * self.0.cfg.n_vocab);
        if !tensor_cores {
            for &t in tokens {
                session.extend(s.eval(&[t], Logits::Last)?);
            }
        }
        // The serving path: several sequences per step, paged cache (blocks of every sequence
        // interleaved in the pool), CUDA graphs per row count.
        let n = tokens.len();
        let kv = BATCH_SEQUENCES * n.div_ceil(kiln_cuda::KV_BLOCK) * kiln_cuda::CudaBatch::block_bytes(&self.0.cfg);
        let mut b = kiln_cuda::CudaBatch::new(self.0, BATCH_SEQUENCES, n, kv)?;
        for slot in 0..BATCH_SEQUENCES {
            anyhow::ensure!(b.admit(slot, tokens, n)?.is_some(), "the paged cache refused a sequence");
        }
        let nv = self.0.cfg.n_vocab;
        let mut served = Vec::with_capacity(tokens.len() * nv);
        for (i, t) in tokens.iter().enumerate() {
            let steps: Vec<kiln_cuda::BatchStep<'_>> = (0..BATCH_SEQUENCES)
                .map(|slot| kiln_cuda::BatchStep {
                    slot,
                    tokens: std::slice::from_ref(t),
                    want: Logits::Last,
                    prompt: false,
                })
                .collect();
            let rows = b.step(&steps)?;
            let want: &[f32] = if tensor_cores { &rows[0] } else { &session[i * nv..(i + 1) * nv] };
            for (slot, row) in rows.iter().enumerate() {
                let same = row.len() == nv && row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                let other = if tensor_cores { "sequence 0's" } else { "the session's" };
                anyhow::ensure!(
                    same,
                    "batched serving step differs from {other} at position {i} (sequence {slot} of {BATCH_SEQUENCES})"
                );
            }
            if tensor_cores {
                served.extend_from_slice(&rows[0]);
            }
        }
        Ok(if tensor_cores { served } else { session })
    }
}

pub fn main(a: Args) -> Result<ExitCode> {
    common::set_threads(a.threads)?;
    a.backend.check()?;
    let tensor_parallel = a.tensor_parallel as usize;
    if tensor_parallel > 1 && a.backend != Backend::Cpu {
        anyhow::bail!("--tensor-parallel runs on the CPU in this build (the multi-GPU split over NCCL is not built)");
    }
    #[cfg(feature = "cuda")]
    let mut device = match a.backend {
        Backend::Cuda => {
            let d = kiln_cuda::Device::open(0)?;
            eprintln!(
                "kiln: CUDA device {} (sm_{}{}), kernels compiled in {:.0} ms",
                d.name, d.capability.0, d.capability.1, d.compile_ms
            );
            Some(d)
        }
        Backend::Cpu => None,
    };
    let dir = common::default_fixture_dir(&a.dir)?;
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for f in parity::fixture_files(&dir)? {
        let name = f.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if a.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let fixture = parity::load_fixture(&f)?;
        let Some(model_path) =
            parity::resolve_model(&dir, &fixture.model, true).with_context(|| format!("fetching {}", fixture.model))?
        else {
            skipped.push((fixture.model.clone(), "model file not found".to_string()));
            continue;
        };
        // The CPU's default path reads the interleaved private copy; the CUDA backend uploads the
        // file's layout.
        let pages = match a.backend {
            Backend::Cuda => kiln_engine::WeightPages::Mapped,
            // Shards take whole rows and columns of the file's layout.
            Backend::Cpu if tensor_parallel > 1 => kiln_engine::WeightPages::Mapped,
            Backend::Cpu => kiln_engine::WeightPages::HugePages,
        };
        let model = Model::load_with(&model_path, pages)?;
        let t0 = std::time::Instant::now();
        let report = if tensor_parallel > 1 {
            let columns = match kiln_model::tensor_parallel::ColumnShards::new(&model.weights, tensor_parallel) {
                Ok(c) => c,
                Err(e) => {
                    skipped.push((fixture.model.clone(), e.to_string()));
                    continue;
                }
            };
            let mut path = TensorParallelDefault { weights: &model.weights, columns: &columns };
            parity::check_model_with(&model, &fixture, &dir, &mut path)?
        } else {
            #[cfg(feature = "cuda")]
            let report = match device.take() {
                Some(dev) => {
                    let gpu = kiln_cuda::CudaModel::upload(dev, &model.weights)?;
                    let r = parity::check_model_with(&model, &fixture, &dir, &mut CudaDefault(&gpu));
                    device = Some(gpu.dev);
                    r?
                }
                None => parity::check_model(&model, &fixture, &dir)?,
            };
            #[cfg(not(feature = "cuda"))]
            let report = parity::check_model(&model, &fixture, &dir)?;
            report
        };
        let split =
            if tensor_parallel > 1 { format!(" over {tensor_parallel} tensor-parallel ranks") } else { String::new() };
        eprintln!(
            "kiln: {}{split} — {} cases, {} positions, {:.1} s: {}",
            fixture.model,
            report.cases,
            report.default.positions,
            t0.elapsed().as_secs_f64(),
            if report.passed() { "pass".to_string() } else { report.failures.join("; ") }
        );
        reports.push(report);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", parity::render_table(&reports));
    }
    for (model, why) in &skipped {
        eprintln!("kiln: skipped {model}: {why}");
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        eprintln!("kiln: {failed} of {} models miss a parity bar", reports.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
