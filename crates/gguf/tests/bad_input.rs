//! One test per kind of malformed file: each crafts the file with the builder (patching bytes
//! where the builder cannot express the fault) and checks the error variant and that its message
//! says what is wrong and where.

use kiln_gguf::writer::array;
use kiln_gguf::{GgmlType, GgufBuilder, GgufError, GgufFile, Value, ValueType};

/// A small valid model: a few keys (incl. a string array) and three tensors.
fn base() -> GgufBuilder {
    let mut b = GgufBuilder::new();
    b.add_str("general.architecture", "llama")
        .add_u32("llama.block_count", 2)
        .add_str_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"])
        .add_f32_tensor("output_norm.weight", &[8], &[1.0; 8])
        .add_tensor("token_embd.weight", &[32, 3], GgmlType::Q8_0, vec![0u8; 3 * 34])
        .add_f32_tensor("output.weight", &[8, 3], &[0.5; 24]);
    b
}

fn open(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(g) => panic!("expected an error, opened {g:?}"),
        Err(e) => e,
    }
}

fn assert_msg(e: &GgufError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

/// Position of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle in file")
}

/// Position of a length-prefixed string (key or tensor name) in the file: its length field.
fn string_at(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(bytes, &needle)
}

/// Position of the value of metadata key `key` (after its type tag).
fn value_at(bytes: &[u8], key: &str) -> usize {
    string_at(bytes, key) + 8 + key.len() + 4
}

/// Position of the offset field of tensor `name` in the tensor table.
fn tensor_offset_field(bytes: &[u8], name: &str) -> usize {
    let p = string_at(bytes, name) + 8 + name.len();
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    p + 4 + 8 * n_dims + 4
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn base_is_valid_and_every_shorter_prefix_fails() {
    let b = base();
    let bytes = b.to_bytes();
    let g = GgufFile::from_bytes(bytes.clone()).unwrap();
    let end = g.tensors.iter().map(|t| g.data_offset + t.offset + t.n_bytes).max().unwrap();
    for n in 0..end as usize {
        assert!(GgufFile::from_bytes(bytes[..n].to_vec()).is_err(), "prefix of {n} bytes opened");
    }
}

#[test]
fn wrong_magic() {
    let mut bytes = base().to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let e = open(bytes);
    assert!(matches!(&e, GgufError::BadMagic { found } if found == b"GGML"), "{e:?}");
    assert_msg(&e, &["not a GGUF file", "magic", "47, 47, 4d, 4c"]);
}

#[test]
fn empty_file() {
    let e = open(Vec::new());
    assert!(matches!(&e, GgufError::Truncated { offset: 0, needed: 4, available: 0, .. }), "{e:?}");
    assert_msg(&e, &["magic", "byte 0"]);
}

#[test]
fn unsupported_version() {
    for v in [0, 1, 4, u32::MAX] {
        let mut b = base();
        b.version(v);
        let e = open(b.to_bytes());
        assert!(matches!(e, GgufError::UnsupportedVersion(x) if x == v), "{e:?}");
        assert_msg(&e, &[&format!("version {v}")]);
    }
    // Version 2 has the same layout as 3 and is accepted.
    let mut b = base();
    b.version(2);
    assert_eq!(GgufFile::from_bytes(b.to_bytes()).unwrap().version, 2);
}

#[test]
fn truncated_header() {
    let bytes = base().to_bytes();
    let e = open(bytes[..10].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset: 8, needed: 8, available: 2, .. }), "{e:?}");
    assert_msg(&e, &["tensor count", "byte 8", "needs 8", "has 2"]);
    let e = open(bytes[..20].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset: 16, .. }), "{e:?}");
    assert_msg(&e, &["metadata count", "byte 16"]);
}

#[test]
fn truncated_metadata_value() {
    let bytes = base().to_bytes();
    let at = value_at(&bytes, "llama.block_count");
    let e = open(bytes[..at + 2].to_vec());
    assert!(
        matches!(&e, GgufError::Truncated { offset, needed: 4, available: 2, .. } if *offset == at as u64),
        "{e:?}"
    );
    assert_msg(&e, &["llama.block_count", &format!("byte {at}")]);
}

#[test]
fn truncated_metadata_key_and_type() {
    let bytes = base().to_bytes();
    // Cut inside the type tag that follows the key.
    let at = string_at(&bytes, "llama.block_count") + 8 + "llama.block_count".len();
    let e = open(bytes[..at + 1].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset, .. } if *offset == at as u64), "{e:?}");
    assert_msg(&e, &["type of metadata key \"llama.block_count\"", &format!("byte {at}")]);
    // Cut inside the key's length field.
    let at = string_at(&bytes, "llama.block_count");
    let e = open(bytes[..at + 3].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset, .. } if *offset == at as u64), "{e:?}");
    assert_msg(&e, &["metadata key #1", &format!("byte {at}")]);
    // Cut inside the key itself: its length runs past the end.
    let e = open(bytes[..at + 10].to_vec());
    assert!(matches!(&e, GgufError::LengthBeyondFile { offset, len: 17, .. } if *offset == at as u64), "{e:?}");
    assert_msg(&e, &["metadata key #1", &format!("byte {at}"), "length 17"]);
}

#[test]
fn truncated_tensor_table() {
    let bytes = base().to_bytes();
    let at = tensor_offset_field(&bytes, "token_embd.weight");
    let e = open(bytes[..at + 5].to_vec());
    assert!(
        matches!(&e, GgufError::Truncated { offset, needed: 8, available: 5, .. } if *offset == at as u64),
        "{e:?}"
    );
    assert_msg(&e, &["tensor \"token_embd.weight\" offset", &format!("byte {at}")]);
    // Inside a dimension.
    let dim1 = at - 4 - 8;
    let e = open(bytes[..dim1 + 1].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset, .. } if *offset == dim1 as u64), "{e:?}");
    assert_msg(&e, &["tensor \"token_embd.weight\" dimension 1"]);
}

#[test]
fn truncated_before_data_section() {
    let b = base();
    let bytes = b.to_bytes();
    let header = b.header_len() as usize;
    assert!(b.data_offset() as usize > header, "base header is already aligned; adjust base()");
    let e = open(bytes[..header].to_vec());
    assert!(matches!(&e, GgufError::Truncated { offset, available: 0, .. } if *offset == header as u64), "{e:?}");
    assert_msg(&e, &["padding before the data section", &format!("byte {header}")]);
}

#[test]
fn truncated_data() {
    let bytes = base().to_bytes();
    let g = GgufFile::from_bytes(bytes.clone()).unwrap();
    let last = g.tensor("output.weight").unwrap().clone();
    let cut = (g.data_offset + last.offset + last.n_bytes - 1) as usize;
    let e = open(bytes[..cut].to_vec());
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { name, start, .. } if name == "output.weight" && *start == last.offset),
        "{e:?}"
    );
    let data_len = cut as u64 - g.data_offset;
    assert_msg(
        &e,
        &[
            "\"output.weight\"",
            &format!("[{}, {})", last.offset, last.offset + last.n_bytes),
            &format!("({data_len} bytes)"),
        ],
    );
}

#[test]
fn string_length_beyond_file() {
    // The length of a string value.
    let mut bytes = base().to_bytes();
    let at = value_at(&bytes, "general.architecture");
    put_u64(&mut bytes, at, 1 << 40);
    let len = bytes.len();
    let e = open(bytes);
    assert!(
        matches!(&e, GgufError::LengthBeyondFile { offset, len: l, file_len, .. }
            if *offset == at as u64 && *l == 1 << 40 && *file_len == len as u64),
        "{e:?}"
    );
    assert_msg(&e, &["general.architecture", &format!("byte {at}"), "length 1099511627776"]);

    // u64::MAX as a tensor name's length.
    let mut bytes = base().to_bytes();
    let at = string_at(&bytes, "output.weight");
    put_u64(&mut bytes, at, u64::MAX);
    let e = open(bytes);
    assert!(matches!(&e, GgufError::LengthBeyondFile { len: u64::MAX, .. }), "{e:?}");
    assert_msg(&e, &["tensor #2 name", &format!("byte {at}")]);
}

#[test]
fn array_length_beyond_file() {
    let mut bytes = base().to_bytes();
    let count_at = value_at(&bytes, "tokenizer.ggml.tokens") + 4;
    assert_eq!(bytes[count_at], 3);
    put_u64(&mut bytes, count_at, u64::MAX);
    // Must fail cleanly without trying to reserve u64::MAX items.
    let e = open(bytes);
    assert!(
        matches!(&e, GgufError::LengthBeyondFile { offset, len: u64::MAX, .. } if *offset == count_at as u64),
        "{e:?}"
    );
    assert_msg(&e, &["tokenizer.ggml.tokens", &format!("byte {count_at}"), "runs past the end"]);

    // A count that fits the remaining bytes for 1-byte elements, not for strings, nor for
    // nested arrays.
    for (elem, name) in [(ValueType::U64, "u64"), (ValueType::Array, "array")] {
        let mut b = GgufBuilder::new();
        b.add_kv("x", array(elem, vec![]));
        let mut bytes = b.to_bytes();
        bytes.extend_from_slice(&[0u8; 64]);
        let count_at = value_at(&bytes, "x") + 4;
        put_u64(&mut bytes, count_at, 9);
        let e = open(bytes);
        assert!(matches!(&e, GgufError::LengthBeyondFile { len: 9, .. }), "{name}: {e:?}");
    }
}

#[test]
fn tensor_data_outside_file() {
    for off in [1u64 << 32, u64::MAX - 31] {
        let mut bytes = base().to_bytes();
        let at = tensor_offset_field(&bytes, "token_embd.weight");
        put_u64(&mut bytes, at, off);
        let e = open(bytes);
        assert!(
            matches!(&e, GgufError::TensorOutOfBounds { name, start, .. } if name == "token_embd.weight" && *start == off),
            "{e:?}"
        );
        assert_msg(&e, &["\"token_embd.weight\"", &off.to_string(), "outside the file"]);
    }
}

#[test]
fn misaligned_tensor() {
    let mut b = GgufBuilder::new();
    b.add_tensor_raw("a", &[4], GgmlType::F32.id(), vec![0u8; 16], Some(0)).add_tensor_raw(
        "b",
        &[4],
        GgmlType::F32.id(),
        vec![0u8; 16],
        Some(36),
    );
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::MisalignedTensor { name, offset: 36, alignment: 32 } if name == "b"), "{e:?}");
    assert_msg(&e, &["\"b\"", "offset 36", "aligned to 32"]);

    // With general.alignment = 8 the same offset is still misaligned, 40 is fine.
    let mut b = GgufBuilder::new();
    b.alignment(8).add_tensor_raw("a", &[4], GgmlType::F32.id(), vec![0u8; 16], Some(36));
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::MisalignedTensor { alignment: 8, .. }), "{e:?}");
    b.tensors[0].offset = Some(40);
    assert_eq!(GgufFile::from_bytes(b.to_bytes()).unwrap().tensors[0].offset, 40);
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48] {
        let mut b = base();
        b.alignment(a);
        let e = open(b.to_bytes());
        assert!(matches!(e, GgufError::BadAlignment(x) if x == a as u64), "{e:?}");
        assert_msg(&e, &["general.alignment", &a.to_string()]);
    }
    let mut b = base();
    b.set_kv("general.alignment", Value::U64(32));
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::WrongValueType { key, .. } if key == "general.alignment"), "{e:?}");
    assert_msg(&e, &["general.alignment", "u64", "u32"]);
}

#[test]
fn overlapping_tensors() {
    let mut b = GgufBuilder::new();
    b.add_tensor_raw("first", &[16], GgmlType::F32.id(), vec![0u8; 64], Some(0)).add_tensor_raw(
        "second",
        &[8],
        GgmlType::F32.id(),
        vec![0u8; 32],
        Some(32),
    );
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::OverlappingTensors { a, b } if a == "first" && b == "second"), "{e:?}");
    assert_msg(&e, &["\"first\"", "\"second\"", "overlap"]);
    // Touching is fine.
    b.tensors[1].offset = Some(64);
    GgufFile::from_bytes(b.to_bytes()).unwrap();
}

#[test]
fn element_count_not_a_block_multiple() {
    for dims in [vec![33u64, 1], vec![16, 2]] {
        let mut b = GgufBuilder::new();
        b.add_tensor("blk.0.attn_q.weight", &dims, GgmlType::Q4_0, vec![0u8; 36]);
        let e = open(b.to_bytes());
        assert!(
            matches!(&e, GgufError::NotBlockMultiple { name, row_len, block: 32, .. }
                if name == "blk.0.attn_q.weight" && *row_len == dims[0]),
            "{e:?}"
        );
        assert_msg(&e, &["\"blk.0.attn_q.weight\"", &format!("row length {}", dims[0]), "Q4_0", "32"]);
    }
    let mut b = GgufBuilder::new();
    b.add_tensor("k", &[128], GgmlType::Q4_K, vec![0u8; 144]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::NotBlockMultiple { block: 256, .. }), "{e:?}");
    assert_msg(&e, &["\"k\"", "Q4_K", "256"]);
}

#[test]
fn bad_shapes() {
    let mut b = GgufBuilder::new();
    b.add_tensor("zero", &[4, 0], GgmlType::F32, vec![]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::BadShape { name, .. } if name == "zero"), "{e:?}");
    assert_msg(&e, &["\"zero\"", "[4, 0]", "zero-sized"]);

    let mut b = GgufBuilder::new();
    b.add_tensor("huge", &[1 << 32, 1 << 32, 4], GgmlType::F32, vec![]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::BadShape { name, .. } if name == "huge"), "{e:?}");
    assert_msg(&e, &["\"huge\"", "overflows"]);
}

#[test]
fn unknown_tensor_type() {
    for id in [4u32, 40, u32::MAX] {
        let mut b = GgufBuilder::new();
        b.add_tensor_raw("w", &[32], id, vec![0u8; 64], None);
        let e = open(b.to_bytes());
        assert!(matches!(&e, GgufError::UnknownTensorType { name, id: x } if name == "w" && *x == id), "{e:?}");
        assert_msg(&e, &["\"w\"", &format!("unknown tensor type id {id}")]);
    }
}

#[test]
fn known_but_unsupported_type_opens() {
    // The reader accepts every type ggml defines (so `kiln inspect` can show any file); refusing
    // types kiln cannot run is the quant/model layer's job (kiln-quant: QuantError::Unsupported).
    let mut b = base();
    b.add_tensor("blk.0.ffn_down.weight", &[256, 2], GgmlType::IQ2_XXS, vec![0u8; 2 * 66]);
    let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
    let t = g.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::IQ2_XXS);
    assert_eq!(t.n_bytes, 132);
    assert!(!t.ggml_type.is_supported());
    assert_eq!(g.tensor_data(t).len(), 132);
}

#[test]
fn duplicate_tensor_name() {
    let mut b = base();
    b.add_f32_tensor("output_norm.weight", &[8], &[0.0; 8]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::DuplicateTensor(n) if n == "output_norm.weight"), "{e:?}");
    assert_msg(&e, &["duplicate tensor name", "\"output_norm.weight\""]);
}

#[test]
fn duplicate_key() {
    let mut b = base();
    b.add_u32("llama.block_count", 3);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::DuplicateKey(k) if k == "llama.block_count"), "{e:?}");
    assert_msg(&e, &["duplicate metadata key", "\"llama.block_count\""]);
}

#[test]
fn wrong_value_type_for_known_key() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("llama.block_count", Value::String("2".into()), "unsigned integer", "string"),
        ("llama.block_count", Value::I32(-2), "unsigned integer", "i32"),
        ("llama.rope.freq_base", Value::String("1e4".into()), "f32 or f64", "string"),
        ("general.architecture", Value::U32(1), "string", "u32"),
        ("tokenizer.ggml.add_bos_token", Value::U8(1), "bool", "u8"),
        ("tokenizer.ggml.tokens", array(ValueType::I32, vec![Value::I32(1)]), "array of string", "array of i32"),
        ("tokenizer.ggml.scores", array(ValueType::F64, vec![]), "array of f32", "array of f64"),
    ];
    for (key, value, expected, found) in cases {
        let mut b = base();
        b.set_kv(key, value);
        let e = open(b.to_bytes());
        assert!(
            matches!(&e, GgufError::WrongValueType { key: k, expected: x, found: f }
                if k == key && x == expected && f == found),
            "{key}: {e:?}"
        );
        assert_msg(&e, &[&format!("{key:?}"), expected, found]);
    }
    // The typed accessors report a wrong type too.
    let g = GgufFile::from_bytes(base().to_bytes()).unwrap();
    let e = g.get_str("llama.block_count").unwrap_err();
    assert_msg(&e, &["\"llama.block_count\"", "u32", "string"]);
}

/// A token type GGUF does not define is refused, naming the token and the value (read as "unused",
/// the token would silently never be produced or rendered). 0..=6 are accepted.
#[test]
fn unknown_token_type_is_refused() {
    let mut b = base();
    b.add_i32_array("tokenizer.ggml.token_type", [1, 99, 3]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::Invalid(_)), "{e:?}");
    assert_msg(&e, &["tokenizer.ggml.token_type", "token 1 has type 99"]);
    let mut b = base();
    b.add_i32_array("tokenizer.ggml.token_type", [-1, 1, 1]);
    assert_msg(&open(b.to_bytes()), &["token 0 has type -1"]);
    for t in 0..=6 {
        let mut b = base();
        b.add_i32_array("tokenizer.ggml.token_type", [t, 1, 1]);
        GgufFile::from_bytes(b.to_bytes()).unwrap_or_else(|e| panic!("type {t}: {e}"));
    }
}

fn nested(depth: usize) -> Value {
    let mut v = array(ValueType::U8, vec![Value::U8(7)]);
    for _ in 1..depth {
        v = array(ValueType::Array, vec![v]);
    }
    v
}

#[test]
fn nesting_too_deep() {
    let mut b = base();
    b.add_kv("deep", nested(kiln_gguf::MAX_ARRAY_NESTING));
    let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
    assert_eq!(g.get("deep"), Some(&nested(kiln_gguf::MAX_ARRAY_NESTING)));

    let mut b = base();
    b.add_kv("deeper", nested(kiln_gguf::MAX_ARRAY_NESTING + 1));
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::NestingTooDeep { key, max: 8 } if key == "deeper"), "{e:?}");
    assert_msg(&e, &["\"deeper\"", "nested deeper than 8"]);

    // Hostile input: a long chain of "array of array" headers must not recurse unboundedly.
    let mut b = GgufBuilder::new();
    b.add_kv("chain", array(ValueType::Array, vec![]));
    let mut bytes = b.to_bytes();
    let count_at = value_at(&bytes, "chain") + 4;
    put_u64(&mut bytes, count_at, 1);
    for _ in 0..100_000 {
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
    }
    let e = open(bytes);
    assert!(matches!(&e, GgufError::NestingTooDeep { key, .. } if key == "chain"), "{e:?}");
}

#[test]
fn too_many_dims() {
    let mut b = GgufBuilder::new();
    b.add_tensor("w5", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0u8; 4]);
    let e = open(b.to_bytes());
    assert!(matches!(&e, GgufError::TooManyDims { name, n_dims: 5 } if name == "w5"), "{e:?}");
    assert_msg(&e, &["\"w5\"", "5 dimensions", "at most 4"]);

    // u32::MAX dims must be refused before any dimension is read or allocated.
    let mut bytes = base().to_bytes();
    let at = string_at(&bytes, "output.weight") + 8 + "output.weight".len();
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = open(bytes);
    assert!(matches!(&e, GgufError::TooManyDims { n_dims: u32::MAX, .. }), "{e:?}");

    // Four is fine.
    let mut b = GgufBuilder::new();
    b.add_tensor("w4", &[2, 1, 1, 2], GgmlType::F32, vec![0u8; 16]);
    assert_eq!(GgufFile::from_bytes(b.to_bytes()).unwrap().tensors[0].n_elements, 4);
}

#[test]
fn unknown_value_type() {
    let mut bytes = base().to_bytes();
    let tag = value_at(&bytes, "llama.block_count") - 4;
    bytes[tag..tag + 4].copy_from_slice(&13u32.to_le_bytes());
    let e = open(bytes);
    assert!(
        matches!(&e, GgufError::UnknownValueType { key, offset, id: 13 } if key == "llama.block_count" && *offset == tag as u64),
        "{e:?}"
    );
    assert_msg(&e, &["\"llama.block_count\"", &format!("byte {tag}"), "id 13"]);

    // The element type of an array.
    let mut bytes = base().to_bytes();
    let tag = value_at(&bytes, "tokenizer.ggml.tokens");
    bytes[tag..tag + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = open(bytes);
    assert!(matches!(&e, GgufError::UnknownValueType { id: 99, offset, .. } if *offset == tag as u64), "{e:?}");
    assert_msg(&e, &["\"tokenizer.ggml.tokens\"", "id 99"]);
}

#[test]
fn invalid_utf8_and_bad_bool() {
    let mut b = base();
    b.add_str("general.name", "abc");
    let mut bytes = b.to_bytes();
    let at = value_at(&bytes, "general.name");
    bytes[at + 8] = 0xff;
    let e = open(bytes);
    assert!(matches!(&e, GgufError::InvalidUtf8 { offset, .. } if *offset == at as u64), "{e:?}");
    assert_msg(&e, &["\"general.name\"", &format!("byte {at}"), "UTF-8"]);

    let mut b = base();
    b.add_bool("tokenizer.ggml.add_bos_token", true);
    let mut bytes = b.to_bytes();
    let at = value_at(&bytes, "tokenizer.ggml.add_bos_token");
    bytes[at] = 2;
    let e = open(bytes);
    assert!(matches!(&e, GgufError::Invalid(_)), "{e:?}");
    assert_msg(&e, &["\"tokenizer.ggml.add_bos_token\"", &format!("byte {at}"), "bool"]);
}

#[test]
fn open_missing_file() {
    let p = std::env::temp_dir().join("kiln-gguf-no-such-file-9f3a/model.gguf");
    let e = GgufFile::open(&p).unwrap_err();
    match &e {
        GgufError::Io { op: "open", path, err } => {
            assert_eq!(path, &p);
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        _ => panic!("{e:?}"),
    }
    assert_msg(&e, &[&p.display().to_string()]);
    // The OS error is in the message once: it is not also the error's source, which error chains
    // print after the message.
    assert!(std::error::Error::source(&e).is_none());
    assert_eq!(e.path(), Some(p.as_path()));
}

#[test]
fn open_directory() {
    let p = std::env::temp_dir();
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(&e, GgufError::NotRegularFile { path, kind: "a directory" } if *path == p), "{e:?}");
    assert_eq!(e.to_string(), format!("{} is not a regular file (a directory)", p.display()));
    assert!(std::error::Error::source(&e).is_none());
}

/// A FIFO is refused at once, not read (which would wait for a writer forever).
#[cfg(unix)]
#[test]
fn open_fifo_is_refused_without_blocking() {
    let dir = std::env::temp_dir().join(format!("kiln-gguf-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("model.gguf");
    let status = std::process::Command::new("mkfifo").arg(&p).status().expect("mkfifo runs");
    assert!(status.success());
    // On another thread, so that a regression fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let q = p.clone();
    std::thread::spawn(move || tx.send(GgufFile::open(&q).map(|_| ()).unwrap_err().to_string()));
    let msg = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("opening a FIFO returned");
    assert_eq!(msg, format!("{} is not a regular file (a FIFO)", p.display()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn open_character_device_is_refused() {
    let e = GgufFile::open("/dev/zero").unwrap_err();
    assert_eq!(e.to_string(), "/dev/zero is not a regular file (a character device)");
}

#[test]
fn open_empty_file_on_disk() {
    let dir = std::env::temp_dir().join(format!("kiln-gguf-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(&e, GgufError::Truncated { offset: 0, .. }), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
