//! Sizes from flags and file metadata: the KV cache's size is checked arithmetic, compared with
//! the memory available, and an allocation the OS refuses is an error, never an abort; files
//! whose hyper-parameters are out of range or whose layer count is absurd are refused.

use std::path::{Path, PathBuf};

use kiln_gguf::{GgmlType, GgufBuilder, GgufFile, Value};
use kiln_model::{check_kv_memory, kv_cache_bytes, KvCache, ModelConfig, ModelError, ModelWeights};

fn synth(file: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/models/synth")).join(file)
}

fn config() -> ModelConfig {
    ModelConfig::from_gguf(&GgufFile::open(synth("synth-tiny-F32.gguf")).expect("open")).expect("config")
}

fn builder(file: &str) -> GgufBuilder {
    GgufBuilder::from_file(&GgufFile::open(synth(file)).expect("open"))
}

fn load_err(b: &GgufBuilder) -> String {
    let g = GgufFile::from_bytes(b.to_bytes()).expect("parse");
    match ModelWeights::load(&g) {
        Ok(_) => panic!("loaded a broken model"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn kv_cache_bytes_is_checked_arithmetic() {
    let cfg = config();
    let per_position = 2 * cfg.n_layer as u64 * cfg.kv_dim() as u64 * 4;
    assert_eq!(kv_cache_bytes(&cfg, 0), Some(0));
    assert_eq!(kv_cache_bytes(&cfg, 1), Some(per_position));
    assert_eq!(kv_cache_bytes(&cfg, 4096), Some(4096 * per_position));
    // 2^62 positions: the product wraps in usize arithmetic; here it is None.
    assert_eq!(kv_cache_bytes(&cfg, 1 << 62), None);
    assert_eq!(kv_cache_bytes(&cfg, usize::MAX), None);
    // The cache built agrees with the reckoning.
    assert_eq!(KvCache::try_new(&cfg, 100).unwrap().capacity_bytes() as u64, kv_cache_bytes(&cfg, 100).unwrap());
}

#[test]
fn check_kv_memory_names_the_size() {
    let cfg = config();
    let small = check_kv_memory(&cfg, 64, 4).expect("4 small slots fit");
    assert_eq!(small, 4 * kv_cache_bytes(&cfg, 64).unwrap());

    let e = check_kv_memory(&cfg, 1 << 62, 1).unwrap_err();
    assert!(matches!(e, ModelError::Memory(_)));
    assert_eq!(
        e.to_string(),
        format!(
            "a context of {} positions is too large: its KV cache ({} layers × {} positions × {} values × 2 (keys \
             and values) × 4 bytes) overflows the address space",
            1u64 << 62,
            cfg.n_layer,
            1u64 << 62,
            cfg.kv_dim()
        )
    );
    // Slots multiply: fine alone, an overflow together.
    let n = (u64::MAX / kv_cache_bytes(&cfg, 1).unwrap()) as usize / 4;
    assert!(kv_cache_bytes(&cfg, n).is_some());
    let e = check_kv_memory(&cfg, n, 2000).unwrap_err().to_string();
    assert!(e.starts_with(&format!("2000 slots of {n} positions is too large")), "{e}");
}

/// More than the memory available now (Linux: MemAvailable) is refused with both sizes named.
#[cfg(target_os = "linux")]
#[test]
fn check_kv_memory_compares_with_available_memory() {
    let cfg = config();
    let available = kiln_model::available_memory().expect("MemAvailable");
    let per_position = kv_cache_bytes(&cfg, 1).unwrap();
    let n_ctx = (available / per_position * 2 + 1) as usize;
    let e = check_kv_memory(&cfg, n_ctx, 1).unwrap_err().to_string();
    assert!(e.starts_with(&format!("a context of {n_ctx} positions needs ")), "{e}");
    assert!(e.contains(" GiB of KV cache (") || e.contains(" TiB of KV cache ("), "{e}");
    assert!(e.ends_with("of memory are available"), "{e}");
    // Slots count: one fits, the same context in enough slots does not.
    let one = (available / per_position / 4) as usize;
    check_kv_memory(&cfg, one, 1).expect("a quarter of the memory fits");
    let e = check_kv_memory(&cfg, one, 16).unwrap_err().to_string();
    assert!(e.starts_with(&format!("16 slots of {one} positions need ")), "{e}");
    assert!(e.contains(&format!("(16 slots × {} layers × {one} positions", cfg.n_layer)), "{e}");
}

/// A size the address space cannot hold, or the allocator refuses, is an error from `try_new`
/// (`vec![0.0; n]` would abort the process).
#[test]
fn kv_cache_try_new_fails_instead_of_aborting() {
    let cfg = config();
    let e = KvCache::try_new(&cfg, 1 << 62).err().expect("refused").to_string();
    assert!(e.contains("overflows the address space"), "{e}");
    // 2^48 bytes per layer buffer: addressable in principle, more than any machine maps.
    let n = (1usize << 48) / (cfg.kv_dim() * 4);
    let e = KvCache::try_new(&cfg, n).err().expect("refused").to_string();
    assert!(e.starts_with(&format!("the allocator refused the KV cache of {n} positions (256.0 TiB per layer")), "{e}");
    // Small ones still work, and zero positions too.
    let c = KvCache::try_new(&cfg, 0).unwrap();
    assert_eq!(c.capacity_bytes(), 0);
}

#[test]
fn absurd_layer_counts_are_refused_before_allocating() {
    // 2^40 layers: above the bound of any dimension.
    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.block_count", Value::U64(1 << 40));
    let e = load_err(&b);
    assert!(e.contains("llama.block_count = 1099511627776 is implausibly large"), "{e}");
    // 5000 layers: a plausible dimension, but more layers than any model has.
    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.block_count", Value::U32(5000));
    let e = load_err(&b);
    assert!(e.contains("llama.block_count = 5000 layers is implausibly many"), "{e}");
    // A plausible count the file has no tensors for: a missing tensor, nothing allocated per layer.
    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.block_count", Value::U32(4000));
    let e = load_err(&b);
    assert!(e.contains("missing tensor \"blk.2.attn_norm.weight\""), "{e}");
}

#[test]
fn non_finite_or_out_of_range_hyper_parameters_are_refused() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::INFINITY), "= inf must be finite"),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(-1e-5), "= -0.0000099"),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(2.0), "= 2 must be finite, at least 0 and below 1"),
        ("llama.rope.freq_base", Value::F32(f32::INFINITY), "llama.rope.freq_base = inf must be finite and positive"),
        ("llama.rope.freq_base", Value::F32(0.0), "llama.rope.freq_base = 0 must be finite and positive"),
        ("llama.rope.freq_base", Value::F64(f64::NAN), "llama.rope.freq_base = NaN must be finite and positive"),
    ];
    for (key, value, needle) in cases {
        let mut b = builder("synth-tiny-F32.gguf");
        b.set_kv(key, value.clone());
        let e = load_err(&b);
        assert!(e.starts_with("invalid hyper-parameters: llama: "), "{key} = {value:?}: {e}");
        assert!(e.contains(needle), "{key} = {value:?}: {e}");
    }
    // RoPE scaling: a linear factor of 0, NaN or ∞ would divide every position away.
    for f in [0.0, f32::NAN, f32::INFINITY, -2.0] {
        let mut b = builder("synth-tiny-F32.gguf");
        b.set_kv("llama.rope.scaling.type", Value::String("linear".into()));
        b.set_kv("llama.rope.scaling.factor", Value::F32(f));
        let e = load_err(&b);
        assert!(e.contains(&format!("llama.rope.scaling.factor = {f} must be finite and positive")), "{f}: {e}");
    }
    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.rope.scaling.type", Value::String("yarn".into()));
    assert!(load_err(&b).contains("rope scaling type \"yarn\" is not supported"));
}

/// `rope_freqs.weight` divides the rotation frequencies: zero or non-finite factors are refused.
#[test]
fn bad_rope_frequency_factors_are_refused() {
    let cfg = config();
    let half = cfg.n_rot / 2;
    for (i, bad) in [(0, 0.0f32), (3, f32::NAN), (half - 1, -1.0)] {
        let mut vals = vec![1.0f32; half];
        vals[i] = bad;
        let mut b = builder("synth-tiny-F32.gguf");
        b.add_f32_tensor("rope_freqs.weight", &[half as u64], &vals);
        let e = load_err(&b);
        assert!(
            e.contains(&format!("rope_freqs.weight[{i}] = {bad}: RoPE frequency factors must be finite and positive")),
            "{e}"
        );
    }
    let mut b = builder("synth-tiny-F32.gguf");
    b.add_f32_tensor("rope_freqs.weight", &[half as u64], &vec![1.5; half]);
    let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
    ModelWeights::load(&g).expect("positive factors load");
}

/// The scan at load finds a NaN among a file's weights (and its counts), quantized or not.
#[test]
fn scan_finds_non_finite_weights() {
    for file in ["synth-tiny-F32.gguf", "synth-tiny-Q4_K.gguf", "synth-tiny-BF16.gguf"] {
        let g = GgufFile::open(synth(file)).unwrap();
        assert!(kiln_model::scan_nonfinite(&g).is_clean(), "{file}");
        let mut b = GgufBuilder::from_file(&g);
        let t = b.tensors.iter_mut().find(|t| t.name == "blk.1.ffn_up.weight").unwrap();
        let ty = GgmlType::from_id(t.type_id).unwrap();
        // The first f16 of the block: Q4_K's d; for the float types the first value's bits.
        match ty {
            GgmlType::F32 => t.data[..4].copy_from_slice(&f32::NAN.to_le_bytes()),
            GgmlType::BF16 => t.data[..2].copy_from_slice(&0x7fc0u16.to_le_bytes()),
            _ => t.data[..2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes()),
        }
        let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
        let r = kiln_model::scan_nonfinite(&g);
        assert_eq!(r.tensors.len(), 1, "{file}: {r}");
        assert_eq!(r.tensors[0].name, "blk.1.ffn_up.weight");
        let expected = if ty == GgmlType::Q4_K { 256 } else { 1 };
        assert_eq!(r.tensors[0].count(), expected, "{file}: {r}");
    }
}
