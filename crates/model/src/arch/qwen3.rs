//! `qwen3`: Qwen3 (dense) — NEOX RoPE, per-head q/k RMSNorm, no biases; the head size comes from
//! `attention.key_length`, so `n_head · head_dim` may differ from `n_embd`.

use super::*;

pub const QWEN3: Architecture = Architecture {
    name: "qwen3",
    rope_pairing: RopePairing::Halves,
    ffn_activation: FfnActivation::Silu,
    // Not in Qwen3's checkpoints, but llama.cpp adds them when a file has them.
    qkv_bias: Presence::Optional,
    qk_norm: Presence::Required,
    post_norms: Presence::Absent,
    embedding_scale: EmbeddingScale::None,
    attention_scale: AttentionScale::InvSqrtHeadDim,
    sliding_window: None,
    logit_softcap_key: None,
};
