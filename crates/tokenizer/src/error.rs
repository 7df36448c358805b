//! What can go wrong while building a tokenizer or converting between text and ids.

/// An error from building a [`crate::Tokenizer`] or from encoding / decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent.
    #[error("missing metadata key {0}")]
    MissingKey(String),
    /// A metadata key has the wrong type.
    #[error("metadata key {key} has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: String },
    /// A per-token array is shorter than the vocabulary.
    #[error("metadata key {key} has {found} entries, but the vocabulary has {n_vocab} tokens")]
    LengthMismatch { key: String, found: usize, n_vocab: usize },
    /// `tokenizer.ggml.model` names a tokenizer kiln does not implement.
    #[error("unknown tokenizer model {0:?} in tokenizer.ggml.model (kiln supports \"llama\" and \"gpt2\")")]
    UnknownModel(String),
    /// `tokenizer.ggml.tokens` is empty.
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocab,
    /// The model asks for a BOS/EOS token that it does not define.
    #[error("{flag_key} is true, but {id_key} is not set")]
    MissingSpecialToken { flag_key: &'static str, id_key: &'static str },
    /// A token id outside the vocabulary.
    #[error("token id {id} is out of range (the vocabulary has {n_vocab} tokens)")]
    IdOutOfRange { id: u32, n_vocab: usize },
    /// An SPM vocabulary without a token for a byte of the input and without an unknown token.
    #[error("no token for byte 0x{0:02X} (no <0x{0:02X}> byte token and no unknown token)")]
    NoByteToken(u8),
    /// The token texts add up to more than the 32-bit offsets of the vocabulary can address.
    #[error("the vocabulary's token texts take {bytes} bytes or more (at most 4 GiB)")]
    VocabTooLarge { bytes: usize },
    /// A pre-tokenizer regex failed to compile or to run.
    #[error("pre-tokenizer regex {pattern:?}: {message}")]
    Regex { pattern: String, message: String },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;
