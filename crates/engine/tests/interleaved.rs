//! The CPU's private weight copy weaves Q4_0/Q4_K/Q5_K matrices for the eight-row generation
//! kernels (`kiln_quant::interleave`), which give the scalar oracle's bits (the row-at-a-time SIMD
//! kernels that read the file's layout, `--mmap`, sum in another f32 order).

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

/// At the scalar level every product is the oracle's, whatever the layout: the woven copy must give
/// the file layout's logits bit for bit (prompt, single-token and two-token steps). The SIMD kernels
/// over woven rows are checked against the oracle bit for bit in `kiln-quant`'s kernel tests, and
/// the default path as a whole against the float64 reference by `kiln parity`.
#[test]
fn woven_weights_compute_the_same_model() {
    // The only test of this binary: the level is chosen once per process, at first use.
    std::env::set_var("KILN_ISA", "scalar");
    assert_eq!(kiln_quant::isa::active_isa(), "scalar");
    for name in ["Q4_0", "Q4_K", "Q5_K", "mixed"] {
        let mapped = Model::load_with(&synth(name), WeightPages::Mapped).unwrap();
        let copied = Model::load_with(&synth(name), WeightPages::HugePages).unwrap();
        if name != "mixed" && cfg!(target_os = "linux") {
            assert!(copied.weights.layers.iter().all(|l| l.w_down.is_interleaved()), "{name}: not woven");
        }
        assert!(mapped.weights.layers.iter().all(|l| !l.w_down.is_interleaved()));
        let same = bits(&logits_at(&mapped, Precision::Fast)) == bits(&logits_at(&copied, Precision::Fast));
        assert!(same, "{name}: the woven copy changed the logits");
    }
}
