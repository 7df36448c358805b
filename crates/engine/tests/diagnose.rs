//! The activation names the diagnostics validate against are the ones the forward pass emits,
//! in the same order.

use std::path::Path;

use kiln_engine::diagnose::{capture, names, Filter};
use kiln_engine::Model;
use kiln_model::Precision;

fn synth(name: &str) -> std::path::PathBuf {
    shared_model(&format!("synth-tiny-{name}.gguf"))
}

fn shared_model(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(file)
}

#[test]
fn forward_emits_the_documented_activations_in_order() {
    // Llama has no q/k norms or post-norms; Gemma 3 has every documented activation.
    let optional = ["q_norm", "k_norm", "attn_post_norm", "ffn_post_norm"];
    for (path, has_optional) in [(synth("F32"), false), (shared_model("synth-gemma3-tiny-Q8_0.gguf"), true)] {
        let model = Model::load(&path).unwrap();
        let n_layer = model.weights.cfg.n_layer;
        let got: Vec<String> = capture(&model, &[1, 2, 3], Precision::Fast, None, Filter::all())
            .unwrap()
            .iter()
            .map(|t| t.name())
            .collect();
        let mut want: Vec<String> = names::PRE_OPS.iter().map(|s| s.to_string()).collect();
        for l in 0..n_layer {
            want.extend(
                names::LAYER_OPS
                    .iter()
                    .filter(|op| has_optional || !optional.contains(op))
                    .map(|op| names::activation_name(Some(l), op)),
            );
        }
        want.extend(names::POST_OPS.iter().map(|s| s.to_string()));
        assert_eq!(got, want, "{}", path.display());
    }
}

#[test]
fn filters_select_layers_and_ops() {
    let model = Model::load(&synth("F32")).unwrap();
    let ops = vec!["kq_soft_max".to_string(), "logits".to_string()];
    let f = Filter::new(model.weights.cfg.n_layer, Some(&[1]), Some(&ops)).unwrap();
    let t = capture(&model, &[1, 2, 3], Precision::Exact, None, f).unwrap();
    let got: Vec<String> = t.iter().map(|t| t.name()).collect();
    assert_eq!(got, ["kq_soft_max-1", "logits"]);
    // 3 tokens x 4 heads rows over 3 positions; logits for every position.
    assert_eq!((t[0].rows, t[0].cols), (12, 3));
    assert_eq!((t[1].rows, t[1].cols), (3, 1024));
}
