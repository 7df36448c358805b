//! Activation names: kiln's (as the forward pass emits them) and llama.cpp's eval-callback names.

/// Activations before the blocks, in forward order.
pub const PRE_OPS: [&str; 1] = ["token_embd"];
/// Activations of every block, in forward order.
/// `q_norm`/`k_norm` (per-head q/k RMSNorm) and the post-norms appear where the architecture has
/// them (Qwen3, Gemma 3).
pub const LAYER_OPS: [&str; 20] = [
    "attn_norm",
    "q",
    "k",
    "v",
    "q_norm",
    "k_norm",
    "q_rope",
    "k_rope",
    "kq_soft_max",
    "attn_out",
    "attn_proj",
    "attn_post_norm",
    "attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_swiglu",
    "ffn_down",
    "ffn_post_norm",
    "ffn_residual",
];
/// Activations after the blocks, in forward order.
pub const POST_OPS: [&str; 2] = ["output_norm", "logits"];

/// Every op name, in forward order.
pub fn all_ops() -> impl Iterator<Item = &'static str> {
    PRE_OPS.iter().chain(LAYER_OPS.iter()).chain(POST_OPS.iter()).copied()
}

/// The `&'static` spelling of an op name, if it is one.
pub fn op_name(op: &str) -> Option<&'static str> {
    all_ops().find(|&o| o == op)
}

pub fn is_layer_op(op: &str) -> bool {
    LAYER_OPS.contains(&op)
}

/// `op-LAYER` for layer activations, `op` otherwise.
pub fn activation_name(layer: Option<usize>, op: &str) -> String {
    match layer {
        Some(l) => format!("{op}-{l}"),
        None => op.to_string(),
    }
}

/// Splits `NAME-N` into (`NAME`, `Some(N)`), anything else into (`name`, `None`).
fn split_layer(name: &str) -> (&str, Option<usize>) {
    if let Some((base, n)) = name.rsplit_once('-') {
        if let Ok(l) = n.parse::<usize>() {
            return (base, Some(l));
        }
    }
    (name, None)
}

/// Parses a kiln activation name (`q_rope-3`, `logits`) into (layer, op).
pub fn parse_kiln(name: &str) -> Option<(Option<usize>, &'static str)> {
    let (base, layer) = split_layer(name);
    let op = op_name(base)?;
    match (layer, is_layer_op(op)) {
        (Some(l), true) => Some((Some(l), op)),
        (None, false) => Some((None, op)),
        _ => None,
    }
}

/// llama.cpp's eval-callback names (`llm_build_llama`, the tensors named with `cb(…)`) and the
/// kiln activation each one is. Qcur/Kcur are named twice by llama.cpp, after the projection and
/// again after RoPE: the first occurrence is `q`/`k`, the second `q_rope`/`k_rope` (Vcur's second
/// occurrence is the same data reshaped and is skipped). `Qcur_rope-N`/`Kcur_rope-N` name the
/// post-RoPE tensors explicitly for converters that de-duplicate.
pub const LLAMA_CPP_NAMES: [(&str, &str); 25] = [
    ("inp_embd", "token_embd"),
    ("attn_norm", "attn_norm"),
    ("Qcur", "q"),
    ("Kcur", "k"),
    ("Vcur", "v"),
    ("Qcur_normed", "q_norm"),
    ("Kcur_normed", "k_norm"),
    ("Qcur_rope", "q_rope"),
    ("Kcur_rope", "k_rope"),
    ("kq_soft_max", "kq_soft_max"),
    ("kq_soft_max_ext", "kq_soft_max"),
    ("kqv_out", "attn_out"),
    ("attn_out", "attn_proj"),
    ("attn_post_norm", "attn_post_norm"),
    ("ffn_inp", "attn_residual"),
    ("ffn_norm", "ffn_norm"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_up", "ffn_up"),
    ("ffn_swiglu", "ffn_swiglu"),
    ("ffn_gate_par", "ffn_swiglu"),
    ("ffn_out", "ffn_down"),
    ("ffn_post_norm", "ffn_post_norm"),
    ("l_out", "ffn_residual"),
    ("result_norm", "output_norm"),
    ("result_output", "logits"),
];

/// Maps a llama.cpp tensor name to (layer, kiln op). `seen_before` says whether the same name
/// already occurred (the post-RoPE Qcur/Kcur). `None`: a tensor kiln has no counterpart for
/// (`norm-0`, `kq-0`, `ffn_silu-0`, the repeated Vcur …), which the comparison skips.
pub fn parse_llama_cpp(name: &str, seen_before: bool) -> Option<(Option<usize>, &'static str)> {
    let (base, layer) = split_layer(name);
    let (_, kiln) = LLAMA_CPP_NAMES.iter().find(|(l, _)| *l == base)?;
    let op = match (*kiln, seen_before) {
        ("q", true) => "q_rope",
        ("k", true) => "k_rope",
        ("v", true) => return None,
        (op, true) if !["q_rope", "k_rope"].contains(&op) => return None,
        (op, _) => op,
    };
    let op = op_name(op)?;
    match (layer, is_layer_op(op)) {
        (Some(l), true) => Some((Some(l), op)),
        (None, false) => Some((None, op)),
        // llama.cpp names its output tensors with layer -1, which the name omits.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_names_round_trip() {
        assert_eq!(parse_kiln("q_rope-3"), Some((Some(3), "q_rope")));
        assert_eq!(parse_kiln("logits"), Some((None, "logits")));
        assert_eq!(parse_kiln("logits-2"), None);
        assert_eq!(parse_kiln("q"), None);
        assert_eq!(parse_kiln("qq-1"), None);
        assert_eq!(all_ops().count(), 23);
    }

    #[test]
    fn llama_cpp_names_map() {
        assert_eq!(parse_llama_cpp("Qcur-0", false), Some((Some(0), "q")));
        assert_eq!(parse_llama_cpp("Qcur-0", true), Some((Some(0), "q_rope")));
        assert_eq!(parse_llama_cpp("Vcur-0", true), None);
        assert_eq!(parse_llama_cpp("attn_out-4", false), Some((Some(4), "attn_proj")));
        assert_eq!(parse_llama_cpp("kqv_out-4", false), Some((Some(4), "attn_out")));
        assert_eq!(parse_llama_cpp("result_output", false), Some((None, "logits")));
        assert_eq!(parse_llama_cpp("norm-0", false), None);
    }
}
