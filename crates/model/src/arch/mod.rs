//! Architectures as data: what distinguishes one model family's forward pass from another's.
//!
//! Every executor (the exact and sectioned passes in `forward.rs`, the lock-step generation pass,
//! the CUDA backend) runs one layer sequence — norm, q/k/v, RoPE, attention, output projection,
//! residual, norm, gated FFN, residual — and reads an [`Architecture`] at a few fixed points
//! (after the embedding lookup, after the q/k/v projections, RoPE's pairing and base, the
//! attention's scale and window, after the two output projections, the FFN's activation, the
//! logits). Adding a family is one small file here plus tests; nothing forks the forward pass.
//!
//! An architecture says which metadata keys and tensors it reads and which options it uses;
//! the numbers themselves (RoPE bases, window sizes, eps, soft-cap) always come from the file's
//! metadata ([`crate::ModelConfig::from_gguf`]), never from the model's name.

mod gemma3;
mod llama;
mod qwen2;
mod qwen3;

/// The architectures kiln runs, by their `general.architecture` name.
pub const ARCHITECTURES: &[&Architecture] = &[&llama::LLAMA, &qwen2::QWEN2, &qwen3::QWEN3, &gemma3::GEMMA3];

/// The architecture named `name`, if kiln runs it.
pub fn architecture(name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().copied().find(|a| a.name == name)
}

/// The supported names, comma-separated (for error messages).
pub fn supported_names() -> String {
    ARCHITECTURES.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

/// One model family's description.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Architecture {
    /// `general.architecture`; also the prefix of its hyper-parameter keys (`NAME.block_count`).
    pub name: &'static str,
    /// Which dimensions RoPE rotates together.
    pub rope_pairing: RopePairing,
    /// The gated FFN's activation: `down(act(gate(h)) · up(h))`.
    pub ffn_activation: FfnActivation,
    /// `blk.N.attn_{q,k,v}.bias`, added to the projections.
    pub qkv_bias: Presence,
    /// `blk.N.attn_{q,k}_norm.weight`: an RMSNorm over each head of q and of k (weights of the
    /// head's length) after the projections and before RoPE.
    pub qk_norm: Presence,
    /// `blk.N.post_attention_norm.weight`, `blk.N.post_ffw_norm.weight`: RMSNorms of the attention
    /// and FFN outputs before their residual adds.
    pub post_norms: Presence,
    /// Whether the embedding rows are multiplied by `sqrt(n_embd)`.
    pub embedding_scale: EmbeddingScale,
    /// The attention scores' scale.
    pub attention_scale: AttentionScale,
    /// Local (sliding-window) attention on some layers, when the file gives a window.
    pub sliding_window: Option<SlidingWindow>,
    /// The metadata key (after `NAME.`) of a final `c·tanh(logits / c)` soft-cap, if the family has one.
    pub logit_softcap_key: Option<&'static str>,
}

/// Whether an optional part of the layer is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Never part of this family (a file that has the tensors is refused: they would be ignored).
    Absent,
    /// Used when the file has it.
    Optional,
    /// The file must have it.
    Required,
}

/// Which dimensions of a head RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// `(x[2i], x[2i+1])`: llama.cpp's "normal" mode (GGUF Llama q/k weights are permuted for it).
    Adjacent,
    /// `(x[i], x[i + n_rot/2])`: llama.cpp's NEOX mode.
    Halves,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// `g / (1 + e^-g)` (SwiGLU).
    Silu,
    /// `0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³)))` (GeGLU, tanh approximation).
    GeluTanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingScale {
    None,
    /// Rows times `sqrt(n_embd)` (Gemma).
    SqrtEmbd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionScale {
    /// `1 / sqrt(head_dim)`, head_dim from `attention.key_length`.
    InvSqrtHeadDim,
    /// Gemma 3: `1 / sqrt(key_length)`, except `1 / sqrt(n_embd / n_head)` for the 62-layer
    /// model (27B), as llama.cpp's `f_attention_scale` and the reference forward do.
    Gemma3,
}

/// Which layers attend locally, and their RoPE base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// The window's key (after `NAME.`); absent or 0 means every layer is global.
    pub window_key: &'static str,
    /// The layer pattern's key: an integer period `p` (layer `l` is local when `l % p < p - 1`;
    /// 0: every layer local) or a per-layer bool array.
    pub pattern_key: &'static str,
    /// The period when the pattern key is absent.
    pub default_period: usize,
    /// The local layers' RoPE base key, and its value when absent. Local layers take no RoPE
    /// scaling.
    pub local_rope_base_key: &'static str,
    pub default_local_rope_base: f64,
}
