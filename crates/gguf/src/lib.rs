//! The GGUF file format: reading (memory-mapped, validated), writing, and a summary for inspection.

mod error;
mod ggml_type;
pub mod inspect;
mod known_keys;
mod reader;
#[cfg(target_os = "linux")]
pub mod sigbus;
mod value;
pub mod writer;

pub use error::{GgufError, Result};
pub use ggml_type::GgmlType;
pub use reader::{Bytes, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_NESTING, MAX_DIMS};
pub use value::{Array, Value, ValueType};
pub use writer::{GgufBuilder, TensorEntry};
