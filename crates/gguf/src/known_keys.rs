//! Type checks for the metadata keys kiln reads, so a wrong type is caught at open with the key named.

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;
use crate::value::{Value, ValueType};

/// What a known key must hold.
#[derive(Clone, Copy)]
enum Expect {
    Str,
    UInt,
    Number,
    Bool,
    ArrayOf(ValueType),
    ArrayOfStr,
}

fn expectation(key: &str) -> Option<Expect> {
    use Expect::*;
    Some(match key {
        "general.architecture"
        | "general.name"
        | "tokenizer.ggml.model"
        | "tokenizer.ggml.pre"
        | "tokenizer.chat_template" => Str,
        "general.alignment" => UInt,
        "general.quantization_version" | "general.file_type" => UInt,
        "tokenizer.ggml.tokens" => ArrayOfStr,
        "tokenizer.ggml.merges" => ArrayOfStr,
        "tokenizer.ggml.scores" => ArrayOf(ValueType::F32),
        "tokenizer.ggml.token_type" => ArrayOf(ValueType::I32),
        "tokenizer.ggml.bos_token_id"
        | "tokenizer.ggml.eos_token_id"
        | "tokenizer.ggml.unknown_token_id"
        | "tokenizer.ggml.padding_token_id"
        | "tokenizer.ggml.seperator_token_id"
        | "tokenizer.ggml.eot_token_id" => UInt,
        "tokenizer.ggml.add_bos_token" | "tokenizer.ggml.add_eos_token" | "tokenizer.ggml.add_space_prefix" => Bool,
        _ => {
            let (_, suffix) = key.split_once('.')?;
            match suffix {
                "context_length"
                | "embedding_length"
                | "block_count"
                | "feed_forward_length"
                | "attention.head_count"
                | "attention.head_count_kv"
                | "rope.dimension_count"
                | "attention.key_length"
                | "attention.value_length"
                | "vocab_size" => UInt,
                "attention.layer_norm_rms_epsilon" | "rope.freq_base" | "rope.scaling.factor" | "rope.scale_linear" => {
                    Number
                }
                _ => return None,
            }
        }
    })
}

fn matches(v: &Value, e: Expect) -> bool {
    match e {
        Expect::Str => matches!(v, Value::String(_)),
        Expect::UInt => v.as_u64().is_some(),
        Expect::Number => matches!(v, Value::F32(_) | Value::F64(_)),
        Expect::Bool => matches!(v, Value::Bool(_)),
        Expect::ArrayOfStr => matches!(v, Value::Array(a) if a.elem_type == ValueType::String),
        Expect::ArrayOf(t) => matches!(v, Value::Array(a) if a.elem_type == t),
    }
}

fn describe(e: Expect) -> String {
    match e {
        Expect::Str => "string".into(),
        Expect::UInt => "unsigned integer".into(),
        Expect::Number => "f32 or f64".into(),
        Expect::Bool => "bool".into(),
        Expect::ArrayOfStr => "array of string".into(),
        Expect::ArrayOf(t) => format!("array of {}", t.name()),
    }
}

pub(crate) fn check_known_keys(g: &GgufFile) -> Result<()> {
    for (k, v) in &g.metadata {
        if let Some(e) = expectation(k) {
            if !matches(v, e) {
                let found = match v {
                    Value::Array(a) => format!("array of {}", a.elem_type.name()),
                    _ => v.value_type().name().to_string(),
                };
                return Err(GgufError::WrongValueType { key: k.clone(), expected: describe(e), found });
            }
        }
    }
    check_token_types(g)
}

/// Token types GGUF defines (llama.cpp's `llama_token_type`): undefined, normal, unknown, control,
/// user-defined, unused, byte.
const TOKEN_TYPES: std::ops::RangeInclusive<i32> = 0..=6;

/// Each `tokenizer.ggml.token_type` entry is a type GGUF defines. Another number is a broken or
/// foreign file, not a token to treat as unused (llama.cpp's reading): the tokenizer would silently
/// stop producing or rendering it.
fn check_token_types(g: &GgufFile) -> Result<()> {
    let Some(Value::Array(a)) = g.get("tokenizer.ggml.token_type") else { return Ok(()) };
    for (id, v) in a.items.iter().enumerate() {
        if let Value::I32(t) = v {
            if !TOKEN_TYPES.contains(t) {
                return Err(GgufError::Invalid(format!(
                    "tokenizer.ggml.token_type: token {id} has type {t}, which GGUF does not define (0 to 6: \
                     undefined, normal, unknown, control, user-defined, unused, byte)"
                )));
            }
        }
    }
    Ok(())
}
