//! Writing GGUF files: a builder for crafting (test) models and for re-serialising a parsed file.
//!
//! The builder does not validate: it writes exactly what it is given (duplicate keys, bad shapes,
//! overlapping explicit offsets, unknown type ids…), so it can also craft malformed files for tests.
//! `GgufBuilder::from_file(&g).to_bytes()` reproduces a file written by llama.cpp or gguf-py byte
//! for byte.

use std::path::Path;

use crate::error::{GgufError, Result};
use crate::ggml_type::GgmlType;
use crate::reader::{align_up, GgufFile, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::value::{Array, Value, ValueType};

/// One tensor to write.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// Raw type id as written (see [`GgmlType::id`]); may be an unknown id when crafting bad files.
    pub type_id: u32,
    /// The tensor's bytes, copied into the data section as they are (their length is not checked).
    pub data: Vec<u8>,
    /// Offset relative to the data section; `None` places the tensor at the next aligned offset
    /// after the previous tensor.
    pub offset: Option<u64>,
}

/// Builds a GGUF file in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufBuilder {
    pub version: u32,
    /// Key/value pairs, written in this order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors, written to the tensor table in this order.
    pub tensors: Vec<TensorEntry>,
    /// Length of the data section. `None`: up to the end of the last tensor, padded to the
    /// alignment; a file without tensors then ends right after the tensor table (as llama.cpp's
    /// vocab-only files do). `Some(n)`: the header is padded to the alignment and the data section
    /// is `n` bytes long (or longer, if a tensor ends beyond `n`).
    pub data_len: Option<u64>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        GgufBuilder::new()
    }
}

impl GgufBuilder {
    /// An empty version-3 file.
    pub fn new() -> GgufBuilder {
        GgufBuilder { version: 3, metadata: Vec::new(), tensors: Vec::new(), data_len: None }
    }

    /// Everything in `g`: version, metadata in order, tensors with their offsets and bytes, and the
    /// data section's length. `to_bytes` then reproduces the file exactly unless its padding
    /// or the gaps between tensors hold non-zero bytes (written back as zeros), or a file without
    /// tensors ends inside the padding after its tensor table.
    pub fn from_file(g: &GgufFile) -> GgufBuilder {
        let file_len = g.bytes().len() as u64;
        GgufBuilder {
            version: g.version,
            metadata: g.metadata.clone(),
            tensors: g
                .tensors
                .iter()
                .map(|t| TensorEntry {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    type_id: t.ggml_type.id(),
                    data: g.tensor_data(t).to_vec(),
                    offset: Some(t.offset),
                })
                .collect(),
            // A file without tensors may end right after its tensor table (then `None`).
            data_len: (file_len >= g.data_offset).then(|| file_len - g.data_offset),
        }
    }

    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets `general.alignment` (a u32 key, replaced if present).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.set_kv("general.alignment", Value::U32(alignment))
    }

    /// Appends a key/value pair (even if the key is already present).
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Replaces the value of `key` in place, or appends it.
    pub fn set_kv(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Removes every pair with this key.
    pub fn remove_kv(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    pub fn add_str(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.add_kv(key, Value::String(value.into()))
    }

    pub fn add_u32(&mut self, key: impl Into<String>, value: u32) -> &mut Self {
        self.add_kv(key, Value::U32(value))
    }

    pub fn add_f32(&mut self, key: impl Into<String>, value: f32) -> &mut Self {
        self.add_kv(key, Value::F32(value))
    }

    pub fn add_bool(&mut self, key: impl Into<String>, value: bool) -> &mut Self {
        self.add_kv(key, Value::Bool(value))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn add_str_array<S: Into<String>>(
        &mut self,
        key: impl Into<String>,
        items: impl IntoIterator<Item = S>,
    ) -> &mut Self {
        let items = items.into_iter().map(|s| Value::String(s.into())).collect();
        self.add_kv(key, array(ValueType::String, items))
    }

    /// An array of f32 (e.g. `tokenizer.ggml.scores`).
    pub fn add_f32_array(&mut self, key: impl Into<String>, items: impl IntoIterator<Item = f32>) -> &mut Self {
        let items = items.into_iter().map(Value::F32).collect();
        self.add_kv(key, array(ValueType::F32, items))
    }

    /// An array of i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn add_i32_array(&mut self, key: impl Into<String>, items: impl IntoIterator<Item = i32>) -> &mut Self {
        let items = items.into_iter().map(Value::I32).collect();
        self.add_kv(key, array(ValueType::I32, items))
    }

    /// Appends a tensor placed at the next aligned offset.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.tensors.push(TensorEntry {
            name: name.into(),
            dims: dims.to_vec(),
            type_id: ty.id(),
            data: data.into(),
            offset: None,
        });
        self
    }

    /// Appends an F32 tensor from values.
    pub fn add_f32_tensor(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> &mut Self {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data)
    }

    /// Appends a tensor with a raw type id and an optional explicit offset (for crafting bad files).
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        data: impl Into<Vec<u8>>,
        offset: Option<u64>,
    ) -> &mut Self {
        self.tensors.push(TensorEntry { name: name.into(), dims: dims.to_vec(), type_id, data: data.into(), offset });
        self
    }

    /// The alignment the file will declare: `general.alignment` when it is a valid u32, else 32.
    pub fn effective_alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => *a as u64,
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Offsets (relative to the data section) at which each tensor will be written.
    pub fn tensor_offsets(&self) -> Vec<u64> {
        let alignment = self.effective_alignment();
        let mut end = 0u64;
        self.tensors
            .iter()
            .map(|t| {
                let off = t.offset.unwrap_or_else(|| align_up(end, alignment));
                end = end.max(off.saturating_add(t.data.len() as u64));
                off
            })
            .collect()
    }

    /// Length of everything before the data section, without padding: header, metadata, tensor
    /// table. Useful to patch bytes of a crafted file.
    pub fn header_len(&self) -> u64 {
        self.header_bytes(&self.tensor_offsets()).len() as u64
    }

    /// Absolute offset of the data section in the written file.
    pub fn data_offset(&self) -> u64 {
        align_up(self.header_len(), self.effective_alignment())
    }

    fn header_bytes(&self, offsets: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.metadata.len() as u64);
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            put_u32(&mut out, value.value_type().id());
            put_value(&mut out, value);
        }
        for (t, &off) in self.tensors.iter().zip(offsets) {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.type_id);
            put_u64(&mut out, off);
        }
        out
    }

    /// The whole file.
    ///
    /// # Panics
    /// If an explicit tensor offset or `data_len` would need a data section larger than memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.effective_alignment();
        let offsets = self.tensor_offsets();
        let mut out = self.header_bytes(&offsets);
        if self.tensors.is_empty() && self.data_len.is_none() {
            return out;
        }
        let data_offset = align_up(out.len() as u64, alignment) as usize;
        out.resize(data_offset, 0);
        let tensors_end =
            self.tensors.iter().zip(&offsets).map(|(t, &off)| off + t.data.len() as u64).max().unwrap_or(0);
        let data_len = match self.data_len {
            Some(n) => n.max(tensors_end),
            None => align_up(tensors_end, alignment),
        };
        out.resize(data_offset + usize::try_from(data_len).expect("data section too large"), 0);
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            let start = data_offset + off as usize;
            out[start..start + t.data.len()].copy_from_slice(&t.data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|err| GgufError::Io {
            op: "write",
            path: path.to_path_buf(),
            err,
        })
    }
}

/// An array value.
pub fn array(elem_type: ValueType, items: Vec<Value>) -> Value {
    Value::Array(Array { elem_type, items })
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A value's payload, without its type tag (arrays: element type, count, then each payload).
fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => {
            put_u32(out, a.elem_type.id());
            put_u64(out, a.items.len() as u64);
            for item in &a.items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_type_round_trips() {
        let mut b = GgufBuilder::new();
        b.add_kv("u8", Value::U8(200))
            .add_kv("i8", Value::I8(-5))
            .add_kv("u16", Value::U16(65000))
            .add_kv("i16", Value::I16(-30000))
            .add_u32("u32", 4_000_000_000)
            .add_kv("i32", Value::I32(-2_000_000_000))
            .add_f32("f32", 1.5)
            .add_bool("bool", true)
            .add_str("string", "héllo\n")
            .add_kv("u64", Value::U64(u64::MAX))
            .add_kv("i64", Value::I64(i64::MIN))
            .add_kv("f64", Value::F64(-0.25))
            .add_str_array("strs", ["a", "", "ccc"])
            .add_kv("empty", array(ValueType::U64, vec![]))
            .add_kv(
                "nested",
                array(
                    ValueType::Array,
                    vec![
                        array(ValueType::I16, vec![Value::I16(1), Value::I16(-2)]),
                        array(ValueType::String, vec![Value::String("x".into())]),
                        array(ValueType::Array, vec![array(ValueType::Bool, vec![Value::Bool(false)])]),
                    ],
                ),
            )
            .alignment(64)
            .add_f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
            .add_tensor("b", &[32, 2], GgmlType::Q8_0, vec![7u8; 68])
            .add_f32_tensor("c", &[1], &[9.0]);
        let bytes = b.to_bytes();
        let g = GgufFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(g.metadata, b.metadata);
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.data_offset, b.data_offset());
        let offs: Vec<u64> = g.tensors.iter().map(|t| t.offset).collect();
        assert_eq!(offs, vec![0, 64, 192]);
        assert_eq!(g.tensor_data(g.tensor("b").unwrap()), &[7u8; 68][..]);
        assert_eq!(bytes.len() as u64, g.data_offset + 256);
        let again = GgufBuilder::from_file(&g);
        assert_eq!(again.to_bytes(), bytes);
    }

    #[test]
    fn no_tensors_means_no_padding() {
        let mut b = GgufBuilder::new();
        b.add_str("general.architecture", "llama");
        let bytes = b.to_bytes();
        assert_eq!(bytes.len() as u64, b.header_len());
        let g = GgufFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(GgufBuilder::from_file(&g).to_bytes(), bytes);
        b.data_len = Some(0);
        let padded = b.to_bytes();
        assert_eq!(padded.len() as u64, b.data_offset());
        let g = GgufFile::from_bytes(padded.clone()).unwrap();
        assert_eq!(GgufBuilder::from_file(&g).to_bytes(), padded);
    }
}
