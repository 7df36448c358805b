//! The `tokenizer.json` kiln writes for the Dynamo frontend (`kiln export-tokenizer`, and the
//! worker at start) encodes every string as kiln does, read by Hugging Face's own tokenizer
//! library (the one the frontend uses): llama.cpp's tokenizer test vocabularies and strings (BPE,
//! SentencePiece, Gemma 3's SentencePiece) and the real SmolLM2 and Gemma 3 270M models with chat
//! text, special tokens included.

use std::path::{Path, PathBuf};

use kiln_gguf::GgufFile;
use kiln_tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tokenizer")
}

/// Exports `gguf`'s tokenizer and checks it on `texts`; returns how many were compared.
fn check(gguf: &Path, texts: &[String]) -> usize {
    let g = GgufFile::open(gguf).expect("gguf");
    let kiln = Tokenizer::from_gguf(&g).expect("kiln tokenizer");
    let files = kiln_engine::hf_files::hf_files(&g, gguf, None).expect("export");
    let json = &files.iter().find(|(n, _)| *n == "tokenizer.json").expect("tokenizer.json").1;
    let hf: tokenizers::Tokenizer = json.to_string().parse().expect("Hugging Face reads the tokenizer.json");
    for t in texts {
        let want = kiln.encode(t, true, true).expect("kiln encodes");
        let got = hf.encode(t.as_str(), true).expect("Hugging Face encodes").get_ids().to_vec();
        assert_eq!(got, want, "{}: {t:?}", gguf.display());
        // And back: the frontend detokenizes what the worker streams, generated tokens without
        // the prompt's BOS (before which llama.cpp, and kiln, keep a SentencePiece word's space).
        let body = match kiln.bos() {
            Some(b) if want.first() == Some(&b) => &want[1..],
            _ => &want[..],
        };
        if !body.is_empty() {
            let text = hf.decode(body, true).expect("decode");
            let kiln_text = kiln.decode(body).expect("kiln decode");
            assert_eq!(text, kiln_text, "{}: decode of {t:?}", gguf.display());
        }
    }
    texts.len()
}

fn vocab_strings(name: &str) -> Vec<String> {
    let inp = std::fs::read_to_string(fixtures().join(format!("ggml-vocab-{name}.gguf.inp"))).expect("inputs");
    inp.split("\n__ggml_vocab_test__\n").map(str::to_string).collect()
}

#[test]
fn llama_cpp_test_vocabularies_encode_identically() {
    for name in ["gpt-2", "llama-spm", "gemma3"] {
        let n = check(&fixtures().join(format!("ggml-vocab-{name}.gguf")), &vocab_strings(name));
        assert!(n > 40, "{name}: {n} strings");
    }
}

#[test]
fn real_models_encode_chat_text_identically() {
    let chat = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 12345 + 678?  Ünïcödé 🦙\n\n<|im_end|>\n<|im_start|>assistant\n",
        "<start_of_turn>user\nHi there  friend\n<end_of_turn>\n<start_of_turn>model\n",
        "def f(x):\n\treturn x ** 2  # square\n",
    ];
    let mut texts: Vec<String> = chat.iter().map(|s| s.to_string()).collect();
    texts.extend(vocab_strings("gpt-2"));
    for m in [&kiln_engine::default_model::SMOLLM2, &kiln_engine::default_model::GEMMA3_270M] {
        match m.ensure() {
            Ok(path) => {
                check(&path, &texts);
            }
            Err(e) => eprintln!("SKIPPED {}: cannot fetch it ({e:#})", m.file_name),
        }
    }
}
