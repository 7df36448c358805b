//! Golden test: rows of `blk.0.ffn_down.weight` of the synth models, dequantized by kiln and by the
//! gguf Python package (0.19), must agree bit for bit. Fixtures: `shared/fixtures/dequant`.

use std::path::{Path, PathBuf};

use kiln_gguf::{GgmlType, GgufFile};
use kiln_quant::{dequantize_row, QuantError};

fn shared_dir() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"));
    assert!(
        dir.join("fixtures/dequant/index.json").is_file(),
        "shared data not found at {} (expected fixtures/dequant/index.json there; \
         the repository's sibling directory `shared` is required for these tests)",
        dir.display()
    );
    dir.to_path_buf()
}

fn check_type(type_name: &str) {
    let shared = shared_dir();
    let fixtures = shared.join("fixtures/dequant");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("index.json")).expect("read index.json"))
            .expect("parse index.json");
    let cases: Vec<&serde_json::Value> = index["cases"]
        .as_array()
        .expect("index.json: cases[]")
        .iter()
        .filter(|c| c["type"].as_str() == Some(type_name))
        .collect();
    assert!(!cases.is_empty(), "no fixture case of type {type_name}");

    for case in cases {
        let model = shared.join(case["model"].as_str().expect("model"));
        let tensor_name = case["tensor"].as_str().expect("tensor");
        let rows: Vec<usize> =
            case["rows"].as_array().expect("rows").iter().map(|r| r.as_u64().expect("row index") as usize).collect();
        let values_bytes =
            std::fs::read(fixtures.join(case["values"].as_str().expect("values"))).expect("read values file");
        let want: Vec<f32> =
            values_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();

        let g = GgufFile::open(&model).unwrap_or_else(|e| panic!("open {}: {e}", model.display()));
        let t = g.tensor(tensor_name).unwrap_or_else(|| panic!("{tensor_name} not in {}", model.display()));
        assert_eq!(t.ggml_type.name(), type_name, "tensor type");
        let cols = t.row_len();
        if let Some(shape) = case["shape_rows_cols"].as_array() {
            assert_eq!(shape[0].as_u64(), Some(t.n_rows() as u64), "rows");
            assert_eq!(shape[1].as_u64(), Some(cols as u64), "cols");
        }
        assert_eq!(want.len(), rows.len() * cols, "values file size");

        let data = g.tensor_data(t);
        let rb = t.row_bytes();
        let mut out = vec![0.0f32; cols];
        for (i, &r) in rows.iter().enumerate() {
            dequantize_row(t.ggml_type, &data[r * rb..(r + 1) * rb], &mut out)
                .unwrap_or_else(|e| panic!("{type_name} row {r}: {e}"));
            let expect = &want[i * cols..(i + 1) * cols];
            for (c, (got, exp)) in out.iter().zip(expect).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    exp.to_bits(),
                    "{type_name} {tensor_name} row {r} col {c}: kiln {got:e} vs gguf-py {exp:e}"
                );
            }
        }
    }
}

#[test]
fn f32_rows() {
    check_type("F32");
}

#[test]
fn f16_rows() {
    check_type("F16");
}

#[test]
fn bf16_rows() {
    check_type("BF16");
}

#[test]
fn q4_0_rows() {
    check_type("Q4_0");
}

#[test]
fn q4_1_rows() {
    check_type("Q4_1");
}

#[test]
fn q5_0_rows() {
    check_type("Q5_0");
}

#[test]
fn q5_1_rows() {
    check_type("Q5_1");
}

#[test]
fn q8_0_rows() {
    check_type("Q8_0");
}

#[test]
fn iq4_nl_rows() {
    check_type("IQ4_NL");
}

#[test]
fn unsupported_type_is_an_error() {
    for ty in [GgmlType::IQ2_XXS, GgmlType::Q8_1, GgmlType::TQ1_0] {
        let n = ty.block_size();
        let src = vec![0u8; ty.type_size()];
        let mut dst = vec![0.0f32; n];
        assert_eq!(dequantize_row(ty, &src, &mut dst), Err(QuantError::Unsupported(ty)));
    }
}

#[test]
fn wrong_lengths_are_errors() {
    let mut dst = vec![0.0f32; 33];
    assert!(matches!(dequantize_row(GgmlType::Q4_0, &[0u8; 36], &mut dst), Err(QuantError::NotBlockMultiple { .. })));
    let mut dst = vec![0.0f32; 32];
    assert!(matches!(dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut dst), Err(QuantError::WrongByteCount { .. })));
}
