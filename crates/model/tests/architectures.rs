//! Architecture descriptions read from the file: Gemma 3's sliding window really limits what a
//! local layer sees, and files that do not match their architecture are refused with the
//! architecture, the tensor or key, and what was expected.

use std::path::{Path, PathBuf};

use kiln_gguf::{GgufBuilder, GgufFile, Value};
use kiln_model::{forward, KvCache, Logits, ModelError, ModelWeights, Precision};

fn synth(file: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/models/synth")).join(file)
}

fn logits_of(w: &ModelWeights, tokens: &[u32], precision: Precision) -> Vec<f32> {
    let mut cache = KvCache::new(&w.cfg, tokens.len());
    forward(w, &mut cache, tokens, precision, Logits::All, None).expect("forward")
}

/// synth gemma3-tiny: layers 0–4 local with a 32-position window, layer 5 global. Positions
/// 0..32 see their whole past either way, so their logits are the same bits with the window
/// removed (an edit of the description); from position 32 on, the window hides keys and the
/// logits change — on the exact path, the prompt kernels and token by token.
#[test]
fn gemma3_window_limits_local_layers() {
    let file = GgufFile::open(synth("synth-gemma3-tiny-Q8_0.gguf")).expect("open");
    let w = ModelWeights::load(&file).expect("load");
    let window = w.cfg.layers.iter().map(|l| l.window).collect::<Vec<_>>();
    assert_eq!(window, [Some(32), Some(32), Some(32), Some(32), Some(32), None]);
    assert_eq!(w.cfg.ropes.len(), 2, "local layers have their own RoPE base");
    assert_eq!((w.cfg.ropes[0].base, w.cfg.ropes[1].base), (1e6, 1e4));
    let mut global = w.clone();
    for l in &mut global.cfg.layers {
        l.window = None;
    }
    let tokens: Vec<u32> = (0..48).map(|i| (i * 37 + 11) % 2048).collect();
    let nv = w.cfg.n_vocab;
    for precision in [Precision::Exact, Precision::Fast] {
        let (a, b) = (logits_of(&w, &tokens, precision), logits_of(&global, &tokens, precision));
        assert!(a[..32 * nv] == b[..32 * nv], "{precision:?}: positions inside the window must not change");
        for p in 32..48 {
            let (ra, rb) = (&a[p * nv..(p + 1) * nv], &b[p * nv..(p + 1) * nv]);
            let diff = ra.iter().zip(rb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff > 1e-3, "{precision:?}: position {p} ignores the window (max difference {diff})");
        }
    }
    // Generation token by token through the cache gives the batch's results past the window too.
    let mut cache = KvCache::new(&w.cfg, tokens.len());
    let batch = logits_of(&w, &tokens, Precision::Exact);
    for (p, &t) in tokens.iter().enumerate() {
        let step = forward(&w, &mut cache, &[t], Precision::Exact, Logits::Last, None).expect("step");
        let want = &batch[p * nv..(p + 1) * nv];
        let err = step.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "position {p}: token-by-token differs from the batch by {err}");
    }
}

fn load_err(b: &GgufBuilder) -> String {
    let g = GgufFile::from_bytes(b.to_bytes()).expect("parse");
    match ModelWeights::load(&g) {
        Ok(_) => panic!("loaded a broken model"),
        Err(e) => e.to_string(),
    }
}

fn builder(file: &str) -> GgufBuilder {
    GgufBuilder::from_file(&GgufFile::open(synth(file)).expect("open"))
}

#[test]
fn missing_required_tensor_names_architecture_and_tensor() {
    let mut b = builder("synth-qwen3-tiny-Q8_0.gguf");
    b.tensors.retain(|t| t.name != "blk.1.attn_k_norm.weight");
    let e = load_err(&b);
    assert_eq!(e, r#"qwen3 model: missing tensor "blk.1.attn_k_norm.weight""#);

    // qwen2 requires all three biases.
    let mut b = builder("synth-qwen2-tiny-Q8_0.gguf");
    b.tensors.retain(|t| t.name != "blk.0.attn_v.bias");
    assert_eq!(load_err(&b), r#"qwen2 model: missing tensor "blk.0.attn_v.bias""#);

    let mut b = builder("synth-gemma3-tiny-Q8_0.gguf");
    b.tensors.retain(|t| t.name != "blk.3.post_ffw_norm.weight");
    assert_eq!(load_err(&b), r#"gemma3 model: missing tensor "blk.3.post_ffw_norm.weight""#);
}

#[test]
fn tensor_of_another_architecture_is_refused() {
    // A q norm in a Llama file would be silently skipped: refused, named.
    let mut b = builder("synth-tiny-F32.gguf");
    b.add_f32_tensor("blk.0.attn_q_norm.weight", &[64], &[1.0; 64]);
    assert_eq!(
        load_err(&b),
        r#"llama model: tensor "blk.0.attn_q_norm.weight" is not part of the llama architecture (kiln would ignore it)"#
    );
    let mut b = builder("synth-tiny-F32.gguf");
    b.add_f32_tensor("blk.0.ffn_gate_inp.weight", &[256, 4], &[0.0; 1024]);
    assert!(load_err(&b).contains(r#""blk.0.ffn_gate_inp.weight" is not part of the llama architecture"#));
}

#[test]
fn wrong_shape_names_what_was_expected() {
    let mut b = builder("synth-qwen3-tiny-Q8_0.gguf");
    let t = b.tensors.iter_mut().find(|t| t.name == "blk.0.attn_q_norm.weight").expect("q norm");
    t.dims = vec![64];
    t.data.truncate(64 * 4);
    assert_eq!(load_err(&b), r#"qwen3 model: tensor "blk.0.attn_q_norm.weight" has shape [64], expected [128]"#);
}

#[test]
fn missing_or_bad_keys_name_the_key() {
    let mut b = builder("synth-qwen2-tiny-Q8_0.gguf");
    b.remove_kv("qwen2.attention.layer_norm_rms_epsilon");
    assert_eq!(load_err(&b), r#"qwen2 model: missing metadata key "qwen2.attention.layer_norm_rms_epsilon""#);

    let mut b = builder("synth-gemma3-tiny-Q8_0.gguf");
    b.set_kv("gemma3.rope.freq_base", Value::F32(f32::INFINITY));
    assert!(load_err(&b).contains("gemma3.rope.freq_base = inf must be finite and positive"), "{}", load_err(&b));

    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::NAN));
    assert!(load_err(&b).contains("llama.attention.layer_norm_rms_epsilon = NaN"), "{}", load_err(&b));

    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("llama.block_count", Value::U64(1 << 40));
    assert!(load_err(&b).contains("implausibly large"), "{}", load_err(&b));
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let mut b = builder("synth-tiny-F32.gguf");
    b.set_kv("general.architecture", Value::String("phi3".into()));
    let g = GgufFile::from_bytes(b.to_bytes()).expect("parse");
    let e = ModelWeights::load(&g).err().expect("refused");
    assert!(matches!(e, ModelError::UnsupportedArchitecture { .. }));
    assert_eq!(e.to_string(), r#"architecture "phi3" is not supported (supported: llama, qwen2, qwen3, gemma3)"#);
}

/// Each architecture's options as its description and the file's metadata give them.
#[test]
fn descriptions_are_read_from_metadata() {
    use kiln_model::arch::{FfnActivation, RopePairing};
    let load = |f: &str| {
        let g = GgufFile::open(synth(f)).expect("open");
        let w = ModelWeights::load(&g).expect("load");
        let has = (
            w.layers[0].qkv_bias.is_some(),
            w.layers[0].qk_norm.is_some(),
            w.layers[0].post_norms.is_some(),
            w.output_is_tied,
        );
        (w.cfg, has)
    };
    let (c, has) = load("synth-tiny-Q8_0.gguf");
    assert_eq!((c.arch.name, c.rope_pairing, c.ffn_activation), ("llama", RopePairing::Adjacent, FfnActivation::Silu));
    assert_eq!(has, (false, false, false, false));
    let (c, has) = load("synth-qwen2-tiny-Q8_0.gguf");
    assert_eq!((c.rope_pairing, c.ropes[0].base, c.rms_eps), (RopePairing::Halves, 1e6, 1e-6_f32 as f64));
    assert_eq!(has, (true, false, false, false));
    let (c, has) = load("synth-qwen3-tiny-Q8_0.gguf");
    assert_eq!((c.head_dim, c.q_dim(), c.n_embd), (128, 512, 256));
    assert_eq!(c.attention_scale, 1.0 / 128f64.sqrt());
    assert_eq!(has, (false, true, false, true));
    let (c, has) = load("synth-gemma3-tiny-Q8_0.gguf");
    assert_eq!((c.ffn_activation, c.embedding_scale, c.logit_softcap), (FfnActivation::GeluTanh, Some(16.0), None));
    assert_eq!(has, (false, true, true, true));
}
