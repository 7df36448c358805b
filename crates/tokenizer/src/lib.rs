//! Tokenizers built from GGUF metadata alone (SentencePiece and byte-level BPE), streaming
//! detokenization, and chat templates.

pub mod template;
