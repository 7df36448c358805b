//! read → `GgufBuilder::from_file` → `to_bytes` reproduces every shared GGUF file byte for byte.

use std::path::{Path, PathBuf};

use kiln_gguf::{GgufBuilder, GgufFile};

fn shared(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|s| s.to_str()) == Some("gguf"))
        .collect();
    files.sort();
    files
}

fn round_trip(p: &Path) {
    let original = std::fs::read(p).unwrap();
    let g = GgufFile::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let b = GgufBuilder::from_file(&g);
    let written = b.to_bytes();
    if written != original {
        let first = written.iter().zip(&original).position(|(a, b)| a != b);
        panic!(
            "{}: written {} bytes, original {}, first difference at {:?}",
            p.display(),
            written.len(),
            original.len(),
            first
        );
    }
    // The writer's own view of the layout agrees with the reader's.
    assert_eq!(b.data_offset(), g.data_offset, "{}", p.display());
    let again = GgufFile::from_bytes(written).unwrap();
    assert_eq!(again.metadata, g.metadata);
    assert_eq!(again.tensors, g.tensors);
}

#[test]
fn synth_models_round_trip() {
    let files = shared("models/synth");
    // 17 Llama models (one per tensor type, mixed, tied) and two each of qwen2, qwen3 and gemma3.
    assert_eq!(files.len(), 23);
    for p in &files {
        round_trip(p);
    }
}

#[test]
fn tokenizer_fixtures_round_trip() {
    let files = shared("fixtures/tokenizer");
    // llama-spm, gpt-2 and gemma3.
    assert_eq!(files.len(), 3);
    for p in &files {
        round_trip(p);
    }
}

#[test]
fn write_then_open_from_disk() {
    let mut b = GgufBuilder::new();
    b.add_str("general.architecture", "llama")
        .add_u32("llama.block_count", 1)
        .add_str_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "a"])
        .add_f32_array("tokenizer.ggml.scores", [0.0, 0.0, 0.0, -1.0])
        .add_i32_array("tokenizer.ggml.token_type", [2, 3, 3, 1])
        .add_f32_tensor("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]);
    let dir = std::env::temp_dir().join(format!("kiln-gguf-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    b.write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_u64("llama.block_count").unwrap(), Some(1));
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().unwrap().items.len(), 4);
    let t = g.tensor("output_norm.weight").unwrap();
    let vals: Vec<f32> = g.tensor_data(t).chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals, [1.0, 2.0, 3.0, 4.0]);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();

    // Writing into a directory that does not exist reports the path.
    let err = b.write(dir.join("missing/x.gguf")).unwrap_err();
    assert!(matches!(err, kiln_gguf::GgufError::Io { .. }));
    assert!(err.to_string().contains("x.gguf"), "{err}");
}
