//! Golden tests of the k-quant and IQ4_XS block formats against rows dequantized by the gguf Python
//! package (`shared/fixtures/dequant`), plus a sanity pass over every such tensor of the mixed model.

use std::path::{Path, PathBuf};

use kiln_gguf::{GgmlType, GgufFile};

const TYPES: [&str; 6] = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"];

fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).to_path_buf()
}

fn fixtures() -> PathBuf {
    shared().join("fixtures/dequant")
}

fn index() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("index.json")).expect("read index.json");
    serde_json::from_str(&text).expect("parse index.json")
}

fn check_type(type_name: &str) {
    let index = index();
    let cases: Vec<&serde_json::Value> =
        index["cases"].as_array().expect("cases").iter().filter(|c| c["type"] == type_name).collect();
    assert!(!cases.is_empty(), "no fixture for {type_name}");
    for case in cases {
        let model = shared().join(case["model"].as_str().unwrap());
        let name = case["tensor"].as_str().unwrap();
        let g = GgufFile::open(&model).unwrap_or_else(|e| panic!("open {}: {e}", model.display()));
        let t = g.tensor(name).expect("tensor in model");
        assert_eq!(t.ggml_type, GgmlType::from_name(type_name).unwrap());
        let shape: Vec<usize> =
            case["shape_rows_cols"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, [t.n_rows(), t.row_len()]);
        let data = g.tensor_data(t);
        let values = std::fs::read(fixtures().join(case["values"].as_str().unwrap())).unwrap();
        let rows: Vec<usize> = case["rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let cols = t.row_len();
        assert_eq!(values.len(), rows.len() * cols * 4);
        let mut out = vec![0f32; cols];
        for (i, &r) in rows.iter().enumerate() {
            let src = &data[r * t.row_bytes()..(r + 1) * t.row_bytes()];
            kiln_quant::dequantize_row(t.ggml_type, src, &mut out).unwrap();
            let want = &values[i * cols * 4..(i + 1) * cols * 4];
            let mut mismatches = 0;
            for (c, (got, w)) in out.iter().zip(want.chunks_exact(4)).enumerate() {
                let w = f32::from_le_bytes(w.try_into().unwrap());
                if got.to_bits() != w.to_bits() {
                    if mismatches < 5 {
                        eprintln!("{type_name} {name} row {r} col {c}: got {got:e}, want {w:e}");
                    }
                    mismatches += 1;
                }
            }
            assert_eq!(mismatches, 0, "{type_name} row {r}: {mismatches} values differ");
        }
    }
}

#[test]
fn q2_k_matches_gguf_py() {
    check_type("Q2_K");
}

#[test]
fn q3_k_matches_gguf_py() {
    check_type("Q3_K");
}

#[test]
fn q4_k_matches_gguf_py() {
    check_type("Q4_K");
}

#[test]
fn q5_k_matches_gguf_py() {
    check_type("Q5_K");
}

#[test]
fn q6_k_matches_gguf_py() {
    check_type("Q6_K");
}

#[test]
fn iq4_xs_matches_gguf_py() {
    check_type("IQ4_XS");
}

#[test]
fn mixed_model_kquant_tensors_are_finite() {
    let g = GgufFile::open(shared().join("models/synth/synth-tiny-mixed.gguf")).unwrap();
    let mut seen = Vec::new();
    for t in &g.tensors {
        if t.dims.len() != 2 || !TYPES.contains(&t.ggml_type.name()) {
            continue;
        }
        let data = g.tensor_data(t);
        let mut out = vec![0f32; t.row_len()];
        for r in 0..t.n_rows() {
            let src = &data[r * t.row_bytes()..(r + 1) * t.row_bytes()];
            kiln_quant::dequantize_row(t.ggml_type, src, &mut out).unwrap();
            if let Some(c) = out.iter().position(|v| !v.is_finite()) {
                panic!("{} row {r} col {c}: {}", t.name, out[c]);
            }
        }
        seen.push(t.ggml_type.name());
    }
    for ty in TYPES {
        assert!(seen.contains(&ty), "mixed model has no 2-D {ty} tensor (saw {seen:?})");
    }
}
