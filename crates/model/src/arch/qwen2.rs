//! `qwen2`: Qwen2 and Qwen2.5 — Llama with q/k/v biases and NEOX RoPE.

use super::*;

pub const QWEN2: Architecture = Architecture {
    name: "qwen2",
    rope_pairing: RopePairing::Halves,
    ffn_activation: FfnActivation::Silu,
    qkv_bias: Presence::Required,
    qk_norm: Presence::Absent,
    post_norms: Presence::Absent,
    embedding_scale: EmbeddingScale::None,
    attention_scale: AttentionScale::InvSqrtHeadDim,
    sliding_window: None,
    logit_softcap_key: None,
};
