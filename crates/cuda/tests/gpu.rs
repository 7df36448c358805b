//! The CUDA forward pass against the CPU default path on the synth models. Needs an NVIDIA GPU;
//! without one (CI) every test prints a visible SKIPPED line and passes.

use std::io::Write;
use std::path::PathBuf;

use kiln_cuda::{CudaModel, CudaSession, Device};
use kiln_gguf::GgufFile;
use kiln_model::{forward, KvCache, LlamaWeights, Logits, Precision};

fn device_or_skip(test: &str) -> Option<Device> {
    match kiln_cuda::probe() {
        Err(e) => {
            skipped(&format!("{test}: {e}"));
            None
        }
        Ok(_) => Some(Device::open(0).expect("a GPU was reported, so it must open")),
    }
}

/// Written to stderr directly: the test harness captures `eprintln!` of passing tests, and a skip
/// must show in CI's log.
fn skipped(what: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// `../shared/models/synth` beside the checkout, or `KILN_SYNTH_DIR` (GPU machines that carry a copy).
fn synth(name: &str) -> PathBuf {
    match std::env::var_os("KILN_SYNTH_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(name),
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Every row of `gpu` against the same row of `cpu` (`n_vocab` wide): the largest rel-L2.
fn worst_row(gpu: &[f32], cpu: &[f32], n_vocab: usize) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    gpu.chunks(n_vocab).zip(cpu.chunks(n_vocab)).map(|(g, c)| rel_l2(g, c)).fold(0.0, f64::max)
}

#[test]
fn probe_says_why_when_there_is_no_gpu() {
    match kiln_cuda::probe() {
        Ok(n) => assert!(n > 0),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "one-line reason expected, got {msg:?}");
            skipped(&format!("probe_says_why_when_there_is_no_gpu (GPU part): {msg}"));
        }
    }
}

/// The mixed model holds every supported weight type, so this covers every decoder; the
/// one-token path (f32 mat-vec) must match the CPU default path closely, the batched path
/// (f16 tensor-core products) within f16 rounding.
#[test]
fn gpu_logits_match_cpu_on_every_type() {
    let Some(dev) = device_or_skip("gpu_logits_match_cpu_on_every_type") else { return };
    let g = GgufFile::open(synth("synth-tiny-mixed.gguf")).expect("synth model");
    let w = LlamaWeights::load(&g).expect("weights");
    let nv = w.cfg.n_vocab;
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % nv as u32).collect();
    let mut cache = KvCache::new(&w.cfg, tokens.len());
    let cpu = forward(&w, &mut cache, &tokens, Precision::Fast, Logits::All, None).expect("cpu forward");
    let gpu_model = CudaModel::upload(dev, &w).expect("upload");
    let mut s = CudaSession::new(&gpu_model, tokens.len()).expect("session");
    let batch = s.eval(&tokens, Logits::All).expect("gpu batch");
    let batch_err = worst_row(&batch, &cpu, nv);
    assert!(batch_err < 1e-2, "batched GPU logits: rel-L2 {batch_err:.2e}");
    let mut s = CudaSession::new(&gpu_model, tokens.len()).expect("session");
    let mut step = Vec::new();
    for &t in &tokens {
        step.extend(s.eval(&[t], Logits::Last).expect("gpu step"));
    }
    let step_err = worst_row(&step, &cpu, nv);
    assert!(step_err < 1e-4, "per-token GPU logits: rel-L2 {step_err:.2e}");
    assert!(s.eval(&[0], Logits::Last).is_err(), "a full context must be refused");
}
