//! Model architectures as data, run by forward functions over weights kept in their stored formats.
//!
//! Data flows one way: GGUF file → [`ModelConfig`] (its [`arch::Architecture`] and metadata) +
//! [`ModelWeights`] → [`forward`] → logits.

pub mod arch;
mod attention_prompt;
mod config;
mod error;
mod fault;
mod forward;
mod forward_lockstep;
mod kv_cache;
mod lockstep_sync;
mod nonfinite;
mod observer;
pub mod tensor_parallel;
mod weights;

pub use config::{LayerAttention, ModelConfig, Rope, RopeScaling};
pub use error::ModelError;
pub use fault::Fault;
pub use forward::{
    forward, forward_batch, forward_batch_with, forward_faulty, forward_shard, forward_ubatched, GenerationPass,
    Logits, PartialSum, Precision, SeqStep, Workspace, MAX_UBATCH,
};
pub use kv_cache::{available_memory, check_kv_memory, human_bytes, kv_cache_bytes, KvCache};
pub use nonfinite::{scan_nonfinite, NonFiniteReport, NonFiniteTensor};
pub use observer::{Activation, Observer};
pub use weights::{interleave_matrices, LayerWeights, ModelWeights, PostNorms, QkNorm, QkvBias};
