//! Running models: loading a GGUF into weights + tokenizer, sessions with a KV cache, sampling,
//! generation, parity checks against the float64 reference fixtures, and the default model.

pub mod backend;
pub mod constraint;
pub mod default_model;
pub mod diagnose;
pub mod hf_files;
pub mod kv_events;
mod loaded;
pub mod parity;
pub mod sampler;
pub mod scheduler;
mod session;
pub mod speculative;

pub use backend::{Backend, GpuModel};
pub use loaded::{Model, WeightPages};
pub use sampler::{Sampler, SamplingParams};
pub use session::{GenerateOptions, Generation, Session, StopReason};
