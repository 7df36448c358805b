//! A summary of a GGUF file for `kiln inspect`: metadata, hyper-parameters, tensor table, totals.
//! Serialises to JSON (everything, long strings in full) or renders as text tables (long values
//! shortened).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::ggml_type::GgmlType;
use crate::reader::GgufFile;
use crate::value::{Value, ValueType};

/// Arrays longer than this are summarised as `{type, len, first}`.
pub const MAX_ARRAY_ITEMS: usize = 16;
/// How many leading items a summarised array keeps.
pub const SUMMARY_ITEMS: usize = 8;
/// Strings longer than this (in characters) are shortened in the text rendering.
pub const TEXT_STRING_CHARS: usize = 60;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The file's path, when it was opened from disk.
    pub path: Option<String>,
    pub file_size: u64,
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub architecture: Option<String>,
    pub hparams: HParams,
    pub metadata: Vec<MetaEntry>,
    pub tensors: Vec<TensorEntry>,
    pub totals: Totals,
}

/// One metadata key/value pair.
#[derive(Debug, Clone, Serialize)]
pub struct MetaEntry {
    pub key: String,
    /// `u32`, `string`, `array[string]`, `array[array[i32]]`, …
    #[serde(rename = "type")]
    pub ty: String,
    pub value: MetaValue,
}

/// A metadata value as shown: scalars as JSON scalars, short arrays in full, long ones summarised.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    Scalar(serde_json::Value),
    Array(Vec<MetaValue>),
    Summarized {
        /// Element type.
        #[serde(rename = "type")]
        elem_type: String,
        len: usize,
        /// The first [`SUMMARY_ITEMS`] items.
        first: Vec<MetaValue>,
    },
}

/// Architecture hyper-parameters (`<arch>.…` keys), each `None` when absent or not a number.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HParams {
    pub name: Option<String>,
    pub file_type: Option<u64>,
    pub quantization_version: Option<u64>,
    pub block_count: Option<u64>,
    pub context_length: Option<u64>,
    pub embedding_length: Option<u64>,
    pub feed_forward_length: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    /// `attention.key_length`, else embedding_length / head_count.
    pub head_dim: Option<u64>,
    pub rope_dimension_count: Option<u64>,
    pub rope_freq_base: Option<f64>,
    pub rope_scaling_type: Option<String>,
    pub rope_scaling_factor: Option<f64>,
    pub layer_norm_rms_epsilon: Option<f64>,
    pub layer_norm_epsilon: Option<f64>,
    pub expert_count: Option<u64>,
    pub expert_used_count: Option<u64>,
    /// Length of `tokenizer.ggml.tokens`, else `<arch>.vocab_size`.
    pub vocab_size: Option<u64>,
    pub tokenizer_model: Option<String>,
    pub tokenizer_pre: Option<String>,
    pub n_merges: Option<u64>,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    pub has_chat_template: bool,
}

/// One row of the tensor table.
#[derive(Debug, Clone, Serialize)]
pub struct TensorEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// ggml order: `shape[0]` is the row length.
    pub shape: Vec<u64>,
    pub n_elements: u64,
    pub bytes: u64,
    /// Offset relative to the data section.
    pub offset: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub n_metadata: usize,
    pub n_tensors: usize,
    pub n_parameters: u64,
    pub bytes: u64,
    /// Tensor bits over parameters (0 when there are none).
    pub bits_per_weight: f64,
    /// One entry per tensor type present, in type-id order.
    pub per_type: Vec<TypeTotal>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TypeTotal {
    #[serde(rename = "type")]
    pub ty: String,
    pub n_tensors: usize,
    pub n_parameters: u64,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

impl Summary {
    pub fn new(g: &GgufFile) -> Summary {
        let metadata = g
            .metadata
            .iter()
            .map(|(k, v)| MetaEntry { key: k.clone(), ty: type_name(v), value: meta_value(v) })
            .collect();
        let tensors: Vec<TensorEntry> = g
            .tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                ty: t.ggml_type.name().to_string(),
                shape: t.dims.clone(),
                n_elements: t.n_elements,
                bytes: t.n_bytes,
                offset: t.offset,
            })
            .collect();

        let mut per: BTreeMap<u32, (GgmlType, usize, u64, u64)> = BTreeMap::new();
        for t in &g.tensors {
            let e = per.entry(t.ggml_type.id()).or_insert((t.ggml_type, 0, 0, 0));
            e.1 += 1;
            e.2 += t.n_elements;
            e.3 += t.n_bytes;
        }
        let n_parameters: u64 = g.tensors.iter().map(|t| t.n_elements).sum();
        let bytes: u64 = g.tensors.iter().map(|t| t.n_bytes).sum();
        let totals = Totals {
            n_metadata: g.metadata.len(),
            n_tensors: g.tensors.len(),
            n_parameters,
            bytes,
            bits_per_weight: bpw(bytes, n_parameters),
            per_type: per
                .into_values()
                .map(|(ty, n, p, b)| TypeTotal {
                    ty: ty.name().to_string(),
                    n_tensors: n,
                    n_parameters: p,
                    bytes: b,
                    bits_per_weight: bpw(b, p),
                })
                .collect(),
        };

        Summary {
            path: g.path.as_ref().map(|p| p.display().to_string()),
            file_size: g.bytes().len() as u64,
            version: g.version,
            alignment: g.alignment,
            data_offset: g.data_offset,
            architecture: g.architecture().map(str::to_string),
            hparams: hparams(g),
            metadata,
            tensors,
            totals,
        }
    }
}

fn bpw(bytes: u64, params: u64) -> f64 {
    if params == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / params as f64
    }
}

fn hparams(g: &GgufFile) -> HParams {
    let uint = |k: &str| g.get(k).and_then(Value::as_u64);
    let num = |k: &str| match g.get(k) {
        Some(Value::F32(x)) => Some(f32_to_f64(*x)),
        v => v.and_then(Value::as_f64),
    };
    let string = |k: &str| g.get(k).and_then(Value::as_str).map(str::to_string);
    let arch = g.architecture().unwrap_or("");
    let a = |suffix: &str| format!("{arch}.{suffix}");
    let head_count = uint(&a("attention.head_count"));
    let embedding_length = uint(&a("embedding_length"));
    let head_dim = uint(&a("attention.key_length")).or(match (embedding_length, head_count) {
        (Some(e), Some(h)) if h > 0 => Some(e / h),
        _ => None,
    });
    let array_len = |k: &str| g.get(k).and_then(Value::as_array).map(|a| a.items.len() as u64);
    HParams {
        name: string("general.name"),
        file_type: uint("general.file_type"),
        quantization_version: uint("general.quantization_version"),
        block_count: uint(&a("block_count")),
        context_length: uint(&a("context_length")),
        embedding_length,
        feed_forward_length: uint(&a("feed_forward_length")),
        head_count,
        head_count_kv: uint(&a("attention.head_count_kv")),
        head_dim,
        rope_dimension_count: uint(&a("rope.dimension_count")),
        rope_freq_base: num(&a("rope.freq_base")),
        rope_scaling_type: string(&a("rope.scaling.type")),
        rope_scaling_factor: num(&a("rope.scaling.factor")),
        layer_norm_rms_epsilon: num(&a("attention.layer_norm_rms_epsilon")),
        layer_norm_epsilon: num(&a("attention.layer_norm_epsilon")),
        expert_count: uint(&a("expert_count")),
        expert_used_count: uint(&a("expert_used_count")),
        vocab_size: array_len("tokenizer.ggml.tokens").or_else(|| uint(&a("vocab_size"))),
        tokenizer_model: string("tokenizer.ggml.model"),
        tokenizer_pre: string("tokenizer.ggml.pre"),
        n_merges: array_len("tokenizer.ggml.merges"),
        bos_token_id: uint("tokenizer.ggml.bos_token_id"),
        eos_token_id: uint("tokenizer.ggml.eos_token_id"),
        has_chat_template: g.get("tokenizer.chat_template").is_some(),
    }
}

/// The f64 nearest to the f32's shortest decimal form, so 1e-5f32 shows as 1e-5, not 9.99999974e-6.
fn f32_to_f64(x: f32) -> f64 {
    if x.is_finite() {
        x.to_string().parse().unwrap_or(x as f64)
    } else {
        x as f64
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Array(a) => match a.items.first() {
            // Nested arrays: describe the first element's type (they need not agree).
            Some(first @ Value::Array(_)) => format!("array[{}]", type_name(first)),
            _ => format!("array[{}]", a.elem_type.name()),
        },
        _ => v.value_type().name().to_string(),
    }
}

fn meta_value(v: &Value) -> MetaValue {
    use serde_json::Value as J;
    MetaValue::Scalar(match v {
        Value::U8(x) => J::from(*x),
        Value::I8(x) => J::from(*x),
        Value::U16(x) => J::from(*x),
        Value::I16(x) => J::from(*x),
        Value::U32(x) => J::from(*x),
        Value::I32(x) => J::from(*x),
        Value::U64(x) => J::from(*x),
        Value::I64(x) => J::from(*x),
        // Non-finite floats have no JSON form: they become null.
        Value::F32(x) => J::from(f32_to_f64(*x)),
        Value::F64(x) => J::from(*x),
        Value::Bool(x) => J::from(*x),
        Value::String(s) => J::from(s.as_str()),
        Value::Array(a) => {
            return if a.items.len() > MAX_ARRAY_ITEMS {
                MetaValue::Summarized {
                    elem_type: elem_type_name(a.elem_type, a.items.first()),
                    len: a.items.len(),
                    first: a.items.iter().take(SUMMARY_ITEMS).map(meta_value).collect(),
                }
            } else {
                MetaValue::Array(a.items.iter().map(meta_value).collect())
            }
        }
    })
}

fn elem_type_name(t: ValueType, first: Option<&Value>) -> String {
    match (t, first) {
        (ValueType::Array, Some(v)) => type_name(v),
        _ => t.name().to_string(),
    }
}

/// Human-readable tables: file, hyper-parameters, metadata (long values shortened), tensors,
/// totals per type.
pub fn render_text(s: &Summary) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "file:         {}", s.path.as_deref().unwrap_or("(in memory)"));
    let _ = writeln!(
        o,
        "format:       GGUF v{}, {} bytes, alignment {}, data at byte {}",
        s.version,
        group(s.file_size),
        s.alignment,
        s.data_offset
    );
    let _ = writeln!(o, "architecture: {}", s.architecture.as_deref().unwrap_or("(none)"));
    let t = &s.totals;
    let _ = writeln!(
        o,
        "parameters:   {} in {} tensors, {} bytes ({}), {:.2} bits/weight",
        group(t.n_parameters),
        t.n_tensors,
        group(t.bytes),
        human_bytes(t.bytes),
        t.bits_per_weight
    );

    let h = &s.hparams;
    let mut rows: Vec<[String; 2]> = Vec::new();
    let mut row = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            rows.push([k.to_string(), v]);
        }
    };
    let u = |x: Option<u64>| x.map(|v| v.to_string());
    let f = |x: Option<f64>| x.map(|v| format!("{v}"));
    row("name", h.name.clone());
    row("file_type", u(h.file_type));
    row("block_count", u(h.block_count));
    row("context_length", u(h.context_length));
    row("embedding_length", u(h.embedding_length));
    row("feed_forward_length", u(h.feed_forward_length));
    row("head_count", u(h.head_count));
    row("head_count_kv", u(h.head_count_kv));
    row("head_dim", u(h.head_dim));
    row("rope.dimension_count", u(h.rope_dimension_count));
    row("rope.freq_base", f(h.rope_freq_base));
    row("rope.scaling.type", h.rope_scaling_type.clone());
    row("rope.scaling.factor", f(h.rope_scaling_factor));
    row("layer_norm_rms_epsilon", f(h.layer_norm_rms_epsilon));
    row("layer_norm_epsilon", f(h.layer_norm_epsilon));
    row("expert_count", u(h.expert_count));
    row("expert_used_count", u(h.expert_used_count));
    row("vocab_size", u(h.vocab_size));
    row("tokenizer", h.tokenizer_model.clone());
    row("tokenizer.pre", h.tokenizer_pre.clone());
    row("merges", u(h.n_merges));
    row("bos_token_id", u(h.bos_token_id));
    row("eos_token_id", u(h.eos_token_id));
    row("chat_template", h.has_chat_template.then(|| "yes".to_string()));
    let _ = writeln!(o, "\nhyper-parameters");
    table(o, &["KEY", "VALUE"], &rows, &[false, false]);

    let _ = writeln!(o, "\nmetadata ({} keys)", s.metadata.len());
    let rows: Vec<[String; 3]> =
        s.metadata.iter().map(|m| [m.key.clone(), m.ty.clone(), text_value(&m.value, true)]).collect();
    table(o, &["KEY", "TYPE", "VALUE"], &rows, &[false, false, false]);

    let _ = writeln!(o, "\ntensors ({})", s.tensors.len());
    let rows: Vec<[String; 6]> = s
        .tensors
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.ty.clone(),
                format!("{:?}", t.shape),
                group(t.n_elements),
                group(t.bytes),
                t.offset.to_string(),
            ]
        })
        .collect();
    table(
        o,
        &["NAME", "TYPE", "SHAPE", "ELEMENTS", "BYTES", "OFFSET"],
        &rows,
        &[false, false, false, true, true, true],
    );

    let _ = writeln!(o, "\ntotals per type");
    let mut rows: Vec<[String; 5]> = t
        .per_type
        .iter()
        .map(|p| {
            [
                p.ty.clone(),
                p.n_tensors.to_string(),
                group(p.n_parameters),
                group(p.bytes),
                format!("{:.4}", p.bits_per_weight),
            ]
        })
        .collect();
    rows.push([
        "all".into(),
        t.n_tensors.to_string(),
        group(t.n_parameters),
        group(t.bytes),
        format!("{:.4}", t.bits_per_weight),
    ]);
    table(o, &["TYPE", "TENSORS", "PARAMETERS", "BYTES", "BITS/WEIGHT"], &rows, &[false, true, true, true, true]);
    out
}

/// A value for the text table: strings quoted and escaped, long ones cut; arrays shortened.
fn text_value(v: &MetaValue, top: bool) -> String {
    match v {
        MetaValue::Scalar(serde_json::Value::String(s)) => {
            let n = s.chars().count();
            let max = if top { TEXT_STRING_CHARS } else { TEXT_STRING_CHARS / 2 };
            if n > max {
                let head: String = s.chars().take(max).collect();
                format!("\"{}\"… ({n} chars)", escape(&head))
            } else {
                format!("\"{}\"", escape(s))
            }
        }
        MetaValue::Scalar(j) => j.to_string(),
        MetaValue::Array(items) => {
            let parts: Vec<String> = items.iter().map(|i| text_value(i, false)).collect();
            format!("[{}]", parts.join(", "))
        }
        MetaValue::Summarized { len, first, .. } => {
            let parts: Vec<String> = first.iter().take(4).map(|i| text_value(i, false)).collect();
            format!("[{}, …] ({len} items)", parts.join(", "))
        }
    }
}

/// Quotes and backslashes escaped, control characters shown as escapes, everything else as is.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Writes an aligned table with two-space indentation; `right[i]` right-aligns column `i`.
fn table<const N: usize>(o: &mut String, header: &[&str; N], rows: &[[String; N]], right: &[bool; N]) {
    let mut w = [0usize; N];
    for (i, h) in header.iter().enumerate() {
        w[i] = h.chars().count();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (i, c) in cells.enumerate() {
            let width = w[i];
            if right[i] {
                let _ = write!(l, " {c:>width$} ");
            } else {
                let _ = write!(l, " {c:<width$} ");
            }
        }
        let _ = writeln!(o, "{}", l.trim_end());
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    // Digits left before the next comma.
    let mut until_comma = (s.len() + 2) % 3 + 1;
    for ch in s.chars() {
        if until_comma == 0 {
            out.push(',');
            until_comma = 3;
        }
        out.push(ch);
        until_comma -= 1;
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{array, GgufBuilder};

    fn synth(name: &str) -> GgufFile {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(name);
        GgufFile::open(p).unwrap()
    }

    #[test]
    fn synth_f32_numbers() {
        let g = synth("synth-tiny-F32.gguf");
        let s = Summary::new(&g);
        let h = &s.hparams;
        assert_eq!(s.architecture.as_deref(), Some("llama"));
        assert_eq!(h.block_count, Some(2));
        assert_eq!(h.embedding_length, Some(256));
        assert_eq!(h.feed_forward_length, Some(512));
        assert_eq!(h.head_count, Some(4));
        assert_eq!(h.head_count_kv, Some(2));
        assert_eq!(h.head_dim, Some(64));
        assert_eq!(h.rope_freq_base, Some(10000.0));
        assert!((h.layer_norm_rms_epsilon.unwrap() - 1e-5).abs() < 1e-10);
        assert_eq!(h.vocab_size, Some(1024));
        assert_eq!(h.bos_token_id, Some(1));
        assert_eq!(h.eos_token_id, Some(2));
        assert!(h.has_chat_template);
        assert_eq!(s.version, 3);
        assert_eq!(s.alignment, 32);
        assert_eq!(s.data_offset, g.data_offset);
        assert_eq!(s.file_size, 6844704);
        assert!(s.path.as_deref().unwrap().ends_with("synth-tiny-F32.gguf"));

        // Every weight is F32: 4 bytes per parameter.
        let t = &s.totals;
        assert_eq!(t.n_tensors, g.tensors.len());
        assert_eq!(t.bytes, t.n_parameters * 4);
        assert_eq!(t.bits_per_weight, 32.0);
        assert_eq!(t.per_type.len(), 1);
        assert_eq!(t.per_type[0].ty, "F32");
        // Token embedding 256×1024 + output 256×1024, 2 layers × (4 attention 256-wide projections,
        // 3 FFN 256×512, 2 norms of 256) + output norm, with GQA: wk, wv are 256×128.
        let per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256;
        assert_eq!(t.n_parameters, 2 * 256 * 1024 + 2 * per_layer + 256);
        let embd = s.tensors.iter().find(|t| t.name == "token_embd.weight").unwrap();
        assert_eq!(embd.shape, vec![256, 1024]);
        assert_eq!(embd.ty, "F32");
        assert_eq!(embd.bytes, 256 * 1024 * 4);

        // Long arrays are summarised, the chat template is kept whole in JSON.
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        let meta = json["metadata"].as_array().unwrap();
        let tokens = meta.iter().find(|m| m["key"] == "tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens["type"], "array[string]");
        assert_eq!(tokens["value"]["type"], "string");
        assert_eq!(tokens["value"]["len"], 1024);
        assert_eq!(tokens["value"]["first"][1], "<s>");
        let tmpl = meta.iter().find(|m| m["key"] == "tokenizer.chat_template").unwrap();
        assert_eq!(tmpl["value"].as_str(), g.get("tokenizer.chat_template").unwrap().as_str());
        assert_eq!(json["hparams"]["block_count"], 2);

        let text = render_text(&s);
        assert!(text.contains("block_count"), "{text}");
        assert!(text.contains("token_embd.weight"));
        assert!(text.contains("(1024 items)"));
        assert!(text.contains("chars)"), "chat template not shortened:\n{text}");
        assert!(text.lines().all(|l| l.chars().count() < 200), "{text}");
    }

    #[test]
    fn mixed_counts_per_type() {
        let g = synth("synth-tiny-mixed.gguf");
        let s = Summary::new(&g);
        let sum: usize = s.totals.per_type.iter().map(|p| p.n_tensors).sum();
        assert_eq!(sum, g.tensors.len());
        assert!(s.totals.per_type.len() >= 15);
        let bytes: u64 = s.totals.per_type.iter().map(|p| p.bytes).sum();
        assert_eq!(bytes, s.totals.bytes);
        let text = render_text(&s);
        assert!(text.contains("IQ4_XS") && text.contains("Q2_K"));
    }

    #[test]
    fn crafted_values() {
        let mut b = GgufBuilder::new();
        b.add_kv("nan", Value::F32(f32::NAN))
            .add_kv("nested", array(ValueType::Array, vec![array(ValueType::U8, vec![Value::U8(1), Value::U8(2)])]))
            .add_kv("long", array(ValueType::U32, (0..100).map(Value::U32).collect()));
        let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
        let s = Summary::new(&g);
        assert_eq!(s.metadata[1].ty, "array[array[u8]]");
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["metadata"][0]["value"].is_null());
        assert_eq!(json["metadata"][1]["value"], serde_json::json!([[1, 2]]));
        assert_eq!(json["metadata"][2]["value"]["len"], 100);
        assert_eq!(json["metadata"][2]["value"]["first"].as_array().unwrap().len(), SUMMARY_ITEMS);
        assert_eq!(s.totals.bits_per_weight, 0.0);
        let text = render_text(&s);
        assert!(text.contains("[[1, 2]]"), "{text}");
        assert!(text.contains("(100 items)"), "{text}");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(12), "12");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(escape("a'b\"c\\\n\u{1}é"), "a'b\\\"c\\\\\\n\\u{1}é");
    }
}
