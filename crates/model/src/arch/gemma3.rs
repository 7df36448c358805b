//! `gemma3`: Gemma 3 (text) — embedding × sqrt(n_embd), per-head q/k RMSNorm, RMSNorms after
//! attention and after the FFN, GELU-tanh gated FFN, local attention on five layers of six with
//! their own RoPE base. (The converter already added Gemma's `1 +` to every norm weight.)

use super::*;

pub const GEMMA3: Architecture = Architecture {
    name: "gemma3",
    rope_pairing: RopePairing::Halves,
    ffn_activation: FfnActivation::GeluTanh,
    qkv_bias: Presence::Absent,
    qk_norm: Presence::Required,
    post_norms: Presence::Required,
    embedding_scale: EmbeddingScale::SqrtEmbd,
    attention_scale: AttentionScale::Gemma3,
    sliding_window: Some(SlidingWindow {
        window_key: "attention.sliding_window",
        pattern_key: "attention.sliding_window_pattern",
        default_period: 6,
        local_rope_base_key: "rope.freq_base_swa",
        default_local_rope_base: 10000.0,
    }),
    logit_softcap_key: Some("final_logit_softcapping"),
};
