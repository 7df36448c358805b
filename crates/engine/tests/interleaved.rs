//! The CPU's private weight copy weaves Q4_0/Q4_K/Q5_K matrices for the eight-row generation
//! kernels (`kiln_quant::interleave`). For the k-quants every logit keeps its bits against the
//! same file read from its map (the row-at-a-time kernels): prompt (matrix-matrix) and generation
//! (matrix-vector) steps. The interleaved Q4_0 kernels give the scalar oracle's bits, the
//! row-at-a-time ones sum blocks in another f32 order: there the two differ by f32 rounding only,
//! far less than either differs from the exact path.

use std::path::Path;

use kiln_engine::{Model, WeightPages};
use kiln_model::{forward, KvCache, Logits, Precision};

fn synth(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(format!("synth-tiny-{name}.gguf"))
}

/// Logits of a 24-token prompt, 6 single-token steps and a two-token step.
fn logits_at(model: &Model, precision: Precision) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(&model.weights.cfg, 64);
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 1000).collect();
    let mut out = vec![forward(&model.weights, &mut cache, &prompt, precision, Logits::All, None).unwrap()];
    for step in 0..6u32 {
        out.push(forward(&model.weights, &mut cache, &[step * 101 + 7], precision, Logits::Last, None).unwrap());
    }
    // Two tokens at once: the two-token kernels.
    out.push(forward(&model.weights, &mut cache, &[11, 12], precision, Logits::All, None).unwrap());
    out
}

fn bits(steps: &[Vec<f32>]) -> Vec<Vec<u32>> {
    steps.iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&p, &q) in a.iter().zip(b) {
        num += (f64::from(p) - f64::from(q)).powi(2);
        den += f64::from(q).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn interleaved_weights_give_the_same_logits() {
    for name in ["Q4_K", "Q5_K"] {
        let mapped = Model::load_with(&synth(name), WeightPages::Mapped).unwrap();
        let copied = Model::load_with(&synth(name), WeightPages::HugePages).unwrap();
        if cfg!(target_os = "linux") {
            assert!(copied.weights.layers.iter().all(|l| l.w_gate.is_interleaved()), "{name}: FFN gates woven");
        }
        assert!(mapped.weights.layers.iter().all(|l| !l.w_gate.is_interleaved()));
        let same = bits(&logits_at(&mapped, Precision::Fast)) == bits(&logits_at(&copied, Precision::Fast));
        assert!(same, "{name}: logits differ between the file's layout and the interleaved copy");
    }
}

/// Q4_0 (and the mixed model, which has Q4_0 matrices): the prompt step keeps its bits; the
/// generation steps are as close to the exact path as the file-layout kernels' (their distance from
/// it is f32 rounding, so another summation order moves them by about as much: per step within
/// 25%, over all steps within 5%).
#[test]
fn interleaved_q4_0_is_as_accurate_as_the_file_layout() {
    for name in ["Q4_0", "mixed"] {
        let mapped = Model::load_with(&synth(name), WeightPages::Mapped).unwrap();
        let copied = Model::load_with(&synth(name), WeightPages::HugePages).unwrap();
        if name == "Q4_0" && cfg!(target_os = "linux") {
            assert!(copied.weights.layers.iter().all(|l| l.w_down.is_interleaved()));
        }
        let (a, b) = (logits_at(&mapped, Precision::Fast), logits_at(&copied, Precision::Fast));
        let exact = logits_at(&mapped, Precision::Exact);
        assert!(bits(&a[..1]) == bits(&b[..1]), "{name}: the prompt step changed");
        let (mut total_a, mut total_b) = (0f64, 0f64);
        for (step, ((x, y), e)) in a.iter().zip(&b).zip(&exact).enumerate().skip(1) {
            let (err_a, err_b) = (rel_l2(x, e), rel_l2(y, e));
            assert!(err_b <= 1.25 * err_a, "{name} step {step}: interleaved {err_b:.2e} vs file layout {err_a:.2e}");
            total_a += err_a;
            total_b += err_b;
        }
        assert!(total_b <= 1.05 * total_a, "{name}: interleaved {total_b:.2e} vs file layout {total_a:.2e}");
    }
}
