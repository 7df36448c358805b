//! The CPU's private weight copy weaves Q4_K/Q5_K matrices for the eight-row generation kernels
//! (`kiln_quant::interleave`); every logit must keep its bits: prompt (matrix-matrix) and
//! generation (matrix-vector) steps, against the same file read from its map.

use std::path::Path;

use kiln_engine::{Model, WeightPages};
use kiln_model::{forward, KvCache, Logits, Precision};

fn synth(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(format!("synth-tiny-{name}.gguf"))
}

fn logits_of(model: &Model) -> Vec<Vec<u32>> {
    let mut cache = KvCache::new(&model.weights.cfg, 64);
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 1000).collect();
    let mut out = vec![forward(&model.weights, &mut cache, &prompt, Precision::Fast, Logits::All, None).unwrap()];
    for step in 0..6u32 {
        out.push(forward(&model.weights, &mut cache, &[step * 101 + 7], Precision::Fast, Logits::Last, None).unwrap());
    }
    // Two tokens at once: the two-token kernels.
    out.push(forward(&model.weights, &mut cache, &[11, 12], Precision::Fast, Logits::All, None).unwrap());
    out.into_iter().map(|v| v.into_iter().map(f32::to_bits).collect()).collect()
}

#[test]
fn interleaved_weights_give_the_same_logits() {
    for name in ["Q4_K", "Q5_K", "mixed"] {
        let mapped = Model::load_with(&synth(name), WeightPages::Mapped).unwrap();
        let copied = Model::load_with(&synth(name), WeightPages::HugePages).unwrap();
        let woven = copied.weights.layers.iter().filter(|l| l.w_gate.is_interleaved()).count();
        if name != "mixed" && cfg!(target_os = "linux") {
            assert_eq!(woven, copied.weights.cfg.n_layer, "{name}: every FFN gate woven");
        }
        assert!(mapped.weights.layers.iter().all(|l| !l.w_gate.is_interleaved()));
        assert_eq!(logits_of(&mapped), logits_of(&copied), "{name}");
    }
}
