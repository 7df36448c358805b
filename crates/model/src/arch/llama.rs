//! `llama`: Llama 1–3, Mistral, SmolLM, TinyLlama and other Llama-shaped files.

use super::*;

pub const LLAMA: Architecture = Architecture {
    name: "llama",
    rope_pairing: RopePairing::Adjacent,
    ffn_activation: FfnActivation::Silu,
    // llama.cpp loads them when present (some fine-tunes have them).
    qkv_bias: Presence::Optional,
    qk_norm: Presence::Absent,
    post_norms: Presence::Absent,
    embedding_scale: EmbeddingScale::None,
    attention_scale: AttentionScale::InvSqrtHeadDim,
    sliding_window: None,
    logit_softcap_key: None,
};
