#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] kiln_gguf::GgufError),
    #[error("architecture {found:?} is not supported (supported: {supported})")]
    UnsupportedArchitecture { found: String, supported: String },
    #[error("model file has no general.architecture key")]
    NoArchitecture,
    #[error("{arch} model: missing metadata key {key:?}")]
    MissingKey { arch: &'static str, key: String },
    #[error("{arch} model: missing tensor {name:?}")]
    MissingTensor { arch: &'static str, name: String },
    #[error("{arch} model: tensor {name:?} is not part of the {arch} architecture (kiln would ignore it)")]
    UnexpectedTensor { arch: &'static str, name: String },
    /// The quant error is part of the message, not also its `source()` (error chains print both).
    #[error("tensor {name:?}: {error}")]
    Tensor { name: String, error: kiln_quant::QuantError },
    #[error("{arch} model: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    BadShape { arch: &'static str, name: String, found: Vec<u64>, expected: Vec<u64> },
    /// A size that overflows, or does not fit in the memory available.
    #[error("{0}")]
    Memory(String),
    /// Tensors holding NaN or infinite values ([`crate::scan_nonfinite`]).
    #[error("{0}")]
    NonFinite(crate::nonfinite::NonFiniteReport),
    #[error("invalid hyper-parameters: {0}")]
    BadConfig(String),
    #[error("token id {id} is out of range (vocabulary has {n_vocab} tokens)")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error("context full: {needed} positions needed but the context holds {n_ctx} (raise --ctx)")]
    ContextFull { needed: usize, n_ctx: usize },
}
