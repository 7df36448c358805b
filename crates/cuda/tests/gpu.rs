//! The CUDA forward pass against the CPU default path on the synth models. Needs an NVIDIA GPU;
//! without one (CI) every test prints a visible SKIPPED line and passes.

use std::io::Write;
use std::path::PathBuf;

use kiln_cuda::{BatchStep, CudaBatch, CudaModel, CudaSession, Device, KV_BLOCK, TENSOR_CORE_MIN_SLOTS};
use kiln_gguf::GgufFile;
use kiln_model::{forward, KvCache, Logits, ModelWeights, Precision};

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
/// one-token path (f32 mat-vec) must match the CPU's exact reference closely, the batched path
/// (f16 tensor-core products) within f16 rounding. (The reference is the exact path, not the
/// CPU default one: the latter quantizes its activations, and its own error, ~3e-4 here on an
/// H100 run of 2026-11-23, is not the GPU's.)
#[test]
fn gpu_logits_match_cpu_on_every_type() {
    let Some(dev) = device_or_skip("gpu_logits_match_cpu_on_every_type") else { return };
    let g = GgufFile::open(synth("synth-tiny-mixed.gguf")).expect("synth model");
    let w = ModelWeights::load(&g).expect("weights");
    let nv = w.cfg.n_vocab;
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % nv as u32).collect();
    let mut cache = KvCache::new(&w.cfg, tokens.len());
    let cpu = forward(&w, &mut cache, &tokens, Precision::Exact, Logits::All, None).expect("cpu forward");
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

/// A prompt in two batched chunks (the second starts at a non-zero position: the tiled prompt
/// attention's causal limits and KV offsets), then one-token steps (the fused q|k|v + RoPE and
/// gate|up + SwiGLU epilogues), against one pass of the CPU's exact path over the whole sequence.
/// The steps attend to keys and values the batched path computed, so they carry its f16 rounding
/// and are held to the batched bound. Models: head size 64
/// with grouped heads (mixed types, and Q4_0 whose fused matrices take the epilogues), and head
/// size 128 when `synth-d128-Q4_0.gguf` is there (GPU machines make it: `make_synth_model.py
/// synth-d128-Q4_0.gguf --type Q4_0 --embd 512 --heads 4 --kv-heads 2`), and rows of several
/// 1024-column tiles of the fast kernel with 4 heads per KV head when `synth-wide-Q4_0.gguf` is
/// there (`--type Q4_0 --embd 2048 --heads 16 --kv-heads 4 --ff 4096`).
#[test]
fn prompt_chunks_then_steps_match_cpu() {
    let Some(mut dev) = device_or_skip("prompt_chunks_then_steps_match_cpu") else { return };
    for name in ["synth-tiny-mixed.gguf", "synth-tiny-Q4_0.gguf", "synth-d128-Q4_0.gguf", "synth-wide-Q4_0.gguf"] {
        let path = synth(name);
        if !path.is_file() {
            skipped(&format!("prompt_chunks_then_steps_match_cpu: {} not found", path.display()));
            continue;
        }
        let g = GgufFile::open(&path).expect("synth model");
        let w = ModelWeights::load(&g).expect("weights");
        let nv = w.cfg.n_vocab;
        let tokens: Vec<u32> = (0..70).map(|i| (i * 53 + 11) % nv as u32).collect();
        let mut cache = KvCache::new(&w.cfg, tokens.len());
        let cpu = forward(&w, &mut cache, &tokens, Precision::Exact, Logits::All, None).expect("cpu forward");
        let gpu_model = CudaModel::upload(dev, &w).expect("upload");
        let mut s = CudaSession::new(&gpu_model, tokens.len()).expect("session");
        let mut batch = s.eval(&tokens[..30], Logits::All).expect("chunk 1");
        batch.extend(s.eval(&tokens[30..62], Logits::All).expect("chunk 2"));
        let batch_err = worst_row(&batch, &cpu[..62 * nv], nv);
        assert!(batch_err < 1e-2, "{name}: batched chunks: rel-L2 {batch_err:.2e}");
        let mut step = Vec::new();
        for &t in &tokens[62..] {
            step.extend(s.eval(&[t], Logits::Last).expect("gpu step"));
        }
        let step_err = worst_row(&step, &cpu[62 * nv..], nv);
        assert!(step_err < 1e-2, "{name}: steps after the prompt: rel-L2 {step_err:.2e}");
        // Every position as a one-token step: f32 throughout, held to the per-token bound.
        let mut s = CudaSession::new(&gpu_model, tokens.len()).expect("session");
        let mut steps = Vec::new();
        for &t in &tokens {
            steps.extend(s.eval(&[t], Logits::Last).expect("gpu step"));
        }
        let steps_err = worst_row(&steps, &cpu, nv);
        assert!(steps_err < 1e-4, "{name}: one-token steps: rel-L2 {steps_err:.2e}");
        drop(s);
        dev = gpu_model.dev;
    }
}

/// The serving path's generation rows on the tensor cores (`CudaModel::set_serving_on_tensor_cores`;
/// a server's choice by slots, `serve_rows_for_slots`;
/// `KILN_CUDA_MMA=1`): three sequences of different tokens stepped together — one token per step,
/// every third step a token and a draft — against the CPU's exact path (the batched path's f16
/// bound: the rows' activations are rounded to f16 as there), and the first sequence stepped alone
/// must give the same bits as beside the others (batch invariance with one kernel for every row
/// count). Models of one weight type each, quantized and float (two activation planes).
#[test]
fn serving_rows_on_tensor_cores() {
    let Some(mut dev) = device_or_skip("serving_rows_on_tensor_cores") else { return };
    for name in ["synth-tiny-Q4_0.gguf", "synth-tiny-Q4_K.gguf", "synth-tiny-Q8_0.gguf", "synth-tiny-F16.gguf"] {
        let path = synth(name);
        if !path.is_file() {
            skipped(&format!("serving_rows_on_tensor_cores: {} not found", path.display()));
            continue;
        }
        let g = GgufFile::open(&path).expect("synth model");
        let w = ModelWeights::load(&g).expect("weights");
        let nv = w.cfg.n_vocab;
        let n = 40;
        let seqs: Vec<Vec<u32>> =
            (0..3).map(|k| (0..n).map(|i| ((i * 37 + 5 + 101 * k) % nv) as u32).collect()).collect();
        let cpu: Vec<Vec<f32>> = seqs
            .iter()
            .map(|t| {
                let mut cache = KvCache::new(&w.cfg, t.len());
                forward(&w, &mut cache, t, Precision::Exact, Logits::All, None).expect("cpu forward")
            })
            .collect();
        let mut gm = CudaModel::upload(dev, &w).expect("upload");
        if std::env::var_os("KILN_CUDA_MMA").is_none() {
            // A server's choice: the single-sequence kernels below the slot threshold.
            assert!(!gm.serve_rows_for_slots(TENSOR_CORE_MIN_SLOTS - 1), "{name}: few slots on the tensor cores");
            assert!(gm.serve_rows_for_slots(TENSOR_CORE_MIN_SLOTS), "{name}: many slots not on the tensor cores");
        }
        gm.set_serving_on_tensor_cores(true).expect("a model the tensor-core rows take");
        let run = |slots: usize| -> Vec<Vec<f32>> {
            let kv = slots * n.div_ceil(KV_BLOCK) * CudaBatch::block_bytes(&gm.cfg);
            let mut b = CudaBatch::new(&gm, slots, n, kv).expect("batch");
            for (slot, seq) in seqs.iter().enumerate().take(slots) {
                b.admit(slot, seq, n).expect("admit").expect("room for the sequence");
            }
            let mut out = vec![Vec::new(); slots];
            let mut at = 0;
            while at < n {
                let k = if at % 3 == 2 && at + 2 <= n { 2 } else { 1 };
                let steps: Vec<BatchStep<'_>> = (0..slots)
                    .map(|slot| BatchStep { slot, tokens: &seqs[slot][at..at + k], want: Logits::All, prompt: false })
                    .collect();
                let rows = b.step(&steps).expect("step");
                for (o, r) in out.iter_mut().zip(rows) {
                    o.extend(r);
                }
                at += k;
            }
            out
        };
        let together = run(3);
        for (k, (got, want)) in together.iter().zip(&cpu).enumerate() {
            let err = worst_row(got, want, nv);
            assert!(err < 1e-2, "{name}: sequence {k} on the tensor cores: rel-L2 {err:.2e}");
        }
        let alone = run(1);
        let same = alone[0].len() == together[0].len()
            && alone[0].iter().zip(&together[0]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: a sequence stepped alone differs from the same sequence beside two others");
        dev = gm.dev;
    }
}
