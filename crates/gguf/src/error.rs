use std::path::{Path, PathBuf};

use crate::value::ValueType;

/// What is wrong with a GGUF file. Every variant says where (byte offset, key or tensor name).
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The OS refused an operation on the file. The OS error is part of the message and
    /// deliberately not also the error's `source()`: error chains print every source after the
    /// message, which printed it twice ("is a directory: is a directory").
    #[error("cannot {op} {path}: {err}")]
    Io { op: &'static str, path: PathBuf, err: std::io::Error },
    /// A directory, FIFO, device or socket: refused before anything reads it (reading a FIFO
    /// waits for a writer forever).
    #[error("{path} is not a regular file ({kind})")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    /// The memory-mapped file was truncated, rewritten or replaced after it was parsed
    /// ([`crate::GgufFile::check_unchanged`]).
    #[error("the model file {path} changed while kiln had it mapped ({what}); restart kiln to load it again")]
    FileChanged { path: PathBuf, what: String },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0} (kiln reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("truncated {what} at byte {offset}: needs {needed} bytes, file has {available}")]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("{what} at byte {offset}: length {len} runs past the end of the file ({file_len} bytes)")]
    LengthBeyondFile { what: String, offset: u64, len: u64, file_len: u64 },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?} at byte {offset}: unknown value type id {id}")]
    UnknownValueType { key: String, offset: u64, id: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    NestingTooDeep { key: String, max: usize },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongValueType { key: String, expected: String, found: String },
    #[error("invalid general.alignment {0}: must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: unknown tensor type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: {n_dims} dimensions (at most 4 allowed)")]
    TooManyDims { name: String, n_dims: u32 },
    #[error("tensor {name:?}: invalid shape {shape:?} ({why})")]
    BadShape { name: String, shape: Vec<u64>, why: String },
    #[error("tensor {name:?}: row length {row_len} is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple { name: String, ty: String, row_len: u64, block: usize },
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: data offset {offset} is not aligned to {alignment}")]
    MisalignedTensor { name: String, offset: u64, alignment: u64 },
    #[error("tensor {name:?}: data [{start}, {end}) lies outside the file's data section ({data_len} bytes)")]
    TensorOutOfBounds { name: String, start: u64, end: u64, data_len: u64 },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    OverlappingTensors { a: String, b: String },
    #[error("{0}")]
    Invalid(String),
}

impl GgufError {
    /// The file the error names in its message, if it names one (the OS-level errors); the
    /// others describe the contents, and whoever opened the file adds its name.
    pub fn path(&self) -> Option<&Path> {
        match self {
            GgufError::Io { path, .. }
            | GgufError::NotRegularFile { path, .. }
            | GgufError::FileChanged { path, .. } => Some(path),
            _ => None,
        }
    }

    pub(crate) fn wrong_type(key: &str, expected: &str, found: ValueType) -> GgufError {
        GgufError::WrongValueType {
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.name().to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, GgufError>;
