//! A model's tokenizer, chat template and shape as Hugging Face's files, made from the GGUF file
//! alone, for front ends that tokenize and template requests themselves (NVIDIA Dynamo's, vLLM's):
//! `tokenizer.json` ([`kiln_tokenizer::Tokenizer::to_hf_json`]), `tokenizer_config.json` (chat
//! template, BOS/EOS), `config.json` (shape and context length) and `generation_config.json`
//! (the end-of-generation ids). That `tokenizer.json` encodes as kiln does is tested with Hugging
//! Face's own tokenizer library by the Dynamo worker's tests (`dynamo/`).

use std::path::Path;

use anyhow::{Context, Result};
use kiln_gguf::GgufFile;
use kiln_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// Writes the files of [`hf_files`] into `dir` (created if missing; the files are replaced).
pub fn write_hf_files(g: &GgufFile, path: &Path, name: Option<&str>, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let files = hf_files(g, path, name)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (file, value) in files {
        let p = dir.join(file);
        // Written beside and renamed into place: workers sharing one directory (same model,
        // same bytes) never let a reader see half a file.
        let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming {} to {}", tmp.display(), p.display()))?;
        written.push(p);
    }
    Ok(written)
}

/// The four files, by name.
pub fn hf_files(g: &GgufFile, path: &Path, name: Option<&str>) -> Result<Vec<(&'static str, Value)>> {
    let tok = Tokenizer::from_gguf(g).with_context(|| format!("{}: tokenizer", path.display()))?;
    let tokenizer = tok.to_hf_json(|k| g.get(k)).with_context(|| format!("{}: tokenizer.json", path.display()))?;
    let arch = g.architecture().context("the file has no general.architecture")?.to_string();
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).map(str::to_string);
    let eog: Vec<u32> = (0..tok.n_vocab() as u32).filter(|&i| tok.is_eog(i)).collect();
    let name = match name {
        Some(n) => n.to_string(),
        None => match g.get_str("general.name")? {
            Some(n) => n.to_string(),
            None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        },
    };
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| -> Result<Option<u64>> { Ok(g.get_u64(&key(k))?) };
    let f = |k: &str| -> Result<Option<f64>> { Ok(g.get_f64(&key(k))?) };
    let n_ctx = u("context_length")?;
    let mut config = Map::new();
    config.insert("_name_or_path".into(), json!(name));
    config.insert("architectures".into(), json!([hf_architecture(&arch)]));
    config.insert("model_type".into(), json!(arch));
    config.insert("vocab_size".into(), json!(tok.n_vocab()));
    for (hf, k) in [
        ("hidden_size", "embedding_length"),
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("intermediate_size", "feed_forward_length"),
        ("max_position_embeddings", "context_length"),
        ("head_dim", "attention.key_length"),
        ("sliding_window", "attention.sliding_window"),
    ] {
        if let Some(v) = u(k)? {
            config.insert(hf.into(), json!(v));
        }
    }
    for (hf, k) in [("rms_norm_eps", "attention.layer_norm_rms_epsilon"), ("rope_theta", "rope.freq_base")] {
        if let Some(v) = f(k)? {
            config.insert(hf.into(), json!(v));
        }
    }
    config.insert("bos_token_id".into(), json!(tok.bos()));
    config.insert("eos_token_id".into(), json!(tok.eos()));
    config.insert("torch_dtype".into(), json!("float32"));

    let mut tc = Map::new();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tc.insert("bos_token".into(), json!(text(tok.bos())));
    tc.insert("eos_token".into(), json!(text(tok.eos())));
    tc.insert("add_bos_token".into(), json!(tok.add_bos()));
    tc.insert("add_eos_token".into(), json!(tok.add_eos()));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(n) = n_ctx {
        tc.insert("model_max_length".into(), json!(n));
    }
    if let Some(t) = g.get_str("tokenizer.chat_template")? {
        tc.insert("chat_template".into(), json!(t));
    }
    let generation = json!({ "bos_token_id": tok.bos(), "eos_token_id": eog });
    Ok(vec![
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", Value::Object(tc)),
        ("config.json", Value::Object(config)),
        ("generation_config.json", generation),
    ])
}

/// Hugging Face's class name for a GGUF architecture (front ends read it to pick defaults).
fn hf_architecture(arch: &str) -> String {
    match arch {
        "llama" => "LlamaForCausalLM".into(),
        "qwen2" => "Qwen2ForCausalLM".into(),
        "qwen3" => "Qwen3ForCausalLM".into(),
        "gemma3" => "Gemma3ForCausalLM".into(),
        other => format!("{}ForCausalLM", other[..1].to_uppercase() + &other[1..]),
    }
}
