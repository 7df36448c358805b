//! The `kiln` binary end to end: generation bars from the parity fixtures, the default model, and
//! one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

fn shared() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    assert!(d.is_dir(), "{} is missing: the shared fixtures are required", d.display());
    d
}

fn synth(name: &str) -> PathBuf {
    shared().join("models/synth").join(format!("synth-tiny-{name}.gguf"))
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_BACKTRACE", "1").output().expect("running kiln")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run with exactly one line on stderr, `kiln: error: …` containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("kiln: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt_tokens: Vec<u32>,
    continuation: Vec<u32>,
}

/// `kiln run --tokens … -n 16 --temp 0 --exact` prints the text of the fixture's greedy
/// continuation (up to the first end-of-generation token, where kiln stops), with the weights
/// copied onto huge pages or read from the map.
#[test]
fn run_exact_greedy_reproduces_q4_k_continuations() {
    let model = synth("Q4_K");
    let fx: Fixture =
        serde_json::from_str(&std::fs::read_to_string(shared().join("fixtures/parity/synth-tiny-Q4_K.json")).unwrap())
            .unwrap();
    let g = kiln_gguf::GgufFile::open(&model).unwrap();
    let tok = kiln_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    // The weights copied onto huge pages (the default) and read from the map (`--mmap`).
    for (case, pages) in fx.cases.iter().flat_map(|c| [(c, None), (c, Some("--mmap"))]) {
        let ids: Vec<String> = case.prompt_tokens.iter().map(|t| t.to_string()).collect();
        let ids = ids.join(",");
        let mut args =
            vec!["run", "-m", model.to_str().unwrap(), "--tokens", &ids, "-n", "16", "--temp", "0", "--exact"];
        args.extend(pages);
        let o = kiln(&args);
        assert!(o.status.success(), "case {}: {}", case.name, stderr(&o));
        let mut dec = tok.decoder();
        let mut want = String::new();
        for &t in case.continuation.iter().take(16) {
            if tok.is_eog(t) {
                break;
            }
            want.push_str(&dec.push(t).unwrap());
        }
        want.push_str(&dec.finish());
        assert_eq!(stdout(&o), format!("{want}\n"), "case {}", case.name);
        assert!(stderr(&o).contains("t/s"), "timings on stderr: {}", stderr(&o));
    }
}

#[test]
fn default_model_knows_the_capital_of_france() {
    if let Err(e) = kiln_engine::default_model::ensure() {
        eprintln!("SKIPPED: the default model could not be fetched: {e:#}");
        return;
    }
    let o = kiln(&["run", "What is the capital of France?", "-n", "16", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "answer: {}", stdout(&o));
}

/// The real Gemma 3 270M (a base model, no chat template) continues a raw prompt exactly as the
/// float64 reference does (`../shared/tools/ref_models.py`'s greedy continuation of
/// `[2, 818, 5279, 529, 7001, 563]`: ids 506 5279 529 506 2891 529 7001 236761).
#[test]
fn gemma3_270m_continues_like_the_float64_reference() {
    let path = match kiln_engine::default_model::GEMMA3_270M.ensure() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED: Gemma 3 270M could not be fetched: {e:#}");
            return;
        }
    };
    let m = path.to_str().unwrap();
    let o = kiln(&["run", "-m", m, "--raw", "The capital of France is", "-n", "8", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), " the capital of the country of France.");
    let o = kiln(&["tokenize", "-m", m, "The capital of France is"]);
    assert_eq!(stdout(&o).trim(), "2,818,5279,529,7001,563");
    // Without a chat template, a chat prompt is used as plain text, with a notice.
    let o = kiln(&["run", "-m", m, "The capital of France is", "-n", "8", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("has no chat template"), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), " the capital of the country of France.");
}

#[test]
fn tokenize_prints_ids_and_pieces() {
    let m = synth("F32");
    let o = kiln(&["tokenize", "-m", m.to_str().unwrap(), "Hello world"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    assert!(line.starts_with("1,"), "BOS first: {line}");
    let o = kiln(&["tokenize", "-m", m.to_str().unwrap(), "--pieces", "--no-bos", "Hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).lines().all(|l| l.contains('\t')), "{}", stdout(&o));
}

#[test]
fn logits_writes_n_tokens_by_n_vocab_f32() {
    let m = synth("Q8_0");
    let dir = std::env::temp_dir().join(format!("kiln-logits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("l.f32");
    let o = kiln(&[
        "logits",
        "-m",
        m.to_str().unwrap(),
        "--tokens",
        "1,415,300",
        "--out",
        out.to_str().unwrap(),
        "--exact",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 3 * 1024 * 4);
    let o = kiln(&["logits", "-m", m.to_str().unwrap(), "--tokens", "1,415"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).lines().filter(|l| !l.trim().is_empty()).count() >= 10, "{}", stdout(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_text_and_json() {
    let m = synth("Q4_K");
    let o = kiln(&["inspect", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("blk.0.attn_q.weight"), "{}", stdout(&o));
    let o = kiln(&["inspect", "--json", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert!(v.is_object());
}

#[test]
fn template_renders_the_tinyllama_prompt() {
    let m = synth("F32");
    let o = kiln(&["template", "-m", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("<|user|>"), "{}", stdout(&o));
}

fn synth_arch(name: &str) -> PathBuf {
    shared().join("models/synth").join(format!("synth-{name}.gguf"))
}

/// Empty text without BOS is no tokens (an empty line), for SentencePiece and BPE alike.
#[test]
fn tokenize_empty_text() {
    for m in ["gemma3-tiny-Q8_0", "qwen2-tiny-Q8_0"] {
        let o = kiln(&["tokenize", "-m", synth_arch(m).to_str().unwrap(), "--no-bos", ""]);
        assert!(o.status.success(), "{m}: {}", stderr(&o));
        assert_eq!(stdout(&o), "\n", "{m}");
    }
    // With BOS, Gemma's BOS alone.
    let o = kiln(&["tokenize", "-m", synth_arch("gemma3-tiny-Q8_0").to_str().unwrap(), ""]);
    assert_eq!(stdout(&o), "2\n");
}

/// `--chat-template NAME` for a model without a template (synth Gemma 3 carries none), or in place
/// of the file's; an unknown name is a one-line error listing the known ones.
#[test]
fn builtin_chat_template_by_name() {
    let gemma = synth_arch("gemma3-tiny-Q8_0");
    let gemma = gemma.to_str().unwrap();
    let o = kiln(&["template", "-m", gemma, "--chat-template", "gemma"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n");
    let o = kiln(&["template", "-m", synth("F32").to_str().unwrap(), "--chat-template", "chatml"]);
    assert_eq!(stdout(&o), "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");

    let o = kiln(&["template", "-m", gemma]);
    assert_one_line_error(&o, "has no chat template (tokenizer.chat_template); give --chat-template NAME");
    for args in [&["template"][..], &["run", "hi"], &["chat"], &["serve"]] {
        let o = kiln(&[args, &["-m", gemma, "--chat-template", "gemma-9"]].concat());
        assert_one_line_error(&o, "unknown chat template \"gemma-9\"; known: chatml, llama2, ");
    }

    // run: without a template the prompt is plain text, with a notice; with one it is rendered.
    let tok = kiln_tokenizer::Tokenizer::from_gguf(&kiln_gguf::GgufFile::open(gemma).unwrap()).unwrap();
    let plain = tok.encode("Hello", true, false).unwrap().len();
    let chat = tok.encode("<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", true, true).unwrap().len();
    let o = kiln(&["run", "-m", gemma, "-n", "1", "--temp", "0", "Hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(
            "kiln: synth-gemma3-tiny-Q8_0.gguf has no chat template; using the prompt as plain text \
             (give --chat-template NAME"
        ),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains(&format!("prompt {plain} tokens")), "{}", stderr(&o));
    let o = kiln(&["run", "-m", gemma, "-n", "1", "--temp", "0", "--chat-template", "gemma", "Hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("no chat template"), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("prompt {chat} tokens")), "{}", stderr(&o));
}

mod bad_input {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-cli-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn missing_model_file() {
        let o = kiln(&["run", "-m", "/nonexistent/model.gguf", "hi"]);
        assert_one_line_error(&o, "/nonexistent/model.gguf");
    }

    #[test]
    fn not_a_gguf_file() {
        let p = tmp("not.gguf", b"this is not a gguf file at all, just text\n");
        let o = kiln(&["run", "-m", p.to_str().unwrap(), "hi"]);
        assert_one_line_error(&o, "magic");
    }

    #[test]
    fn truncated_gguf_file() {
        let bytes = std::fs::read(synth("Q4_0")).unwrap();
        let p = tmp("trunc.gguf", &bytes[..bytes.len() / 2]);
        let o = kiln(&["inspect", p.to_str().unwrap()]);
        assert!(!o.status.success());
        assert_one_line_error(&o, "trunc.gguf");
    }

    #[test]
    fn unsupported_architecture_is_named_with_the_supported_list() {
        let mut bytes = std::fs::read(synth("Q4_0")).unwrap();
        // Patch the value of general.architecture ("llama" → "mamba", same length).
        let key = b"general.architecture";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        let val = at + 4 + 8; // value type (u32) + string length (u64)
        assert_eq!(&bytes[val..val + 5], b"llama");
        bytes[val..val + 5].copy_from_slice(b"mamba");
        let p = tmp("mamba.gguf", &bytes);
        let o = kiln(&["run", "-m", p.to_str().unwrap(), "--tokens", "1,2"]);
        assert_one_line_error(&o, "mamba");
        assert!(stderr(&o).contains("llama"), "lists the supported ones: {}", stderr(&o));
    }

    #[test]
    fn token_id_out_of_range() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), "--tokens", "1,5000"]);
        assert_one_line_error(&o, "5000");
    }

    #[test]
    fn empty_prompt() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), ""]);
        assert_one_line_error(&o, "empty");
    }

    #[test]
    fn zero_tokens_requested() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), "-n", "0", "hi"]);
        assert_one_line_error(&o, "-n");
    }

    #[test]
    fn contradictory_flags() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), "--tokens", "1,2", "--raw"]);
        assert_one_line_error(&o, "cannot be used with");
    }

    #[test]
    fn prompt_longer_than_the_context() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), "--tokens", "1,2,3,4,5", "--ctx", "4"]);
        assert_one_line_error(&o, "context");
    }

    #[test]
    fn bad_sampling_values() {
        let o = kiln(&["run", "-m", synth("Q4_0").to_str().unwrap(), "--tokens", "1,2", "--top-p", "2"]);
        assert_one_line_error(&o, "top");
    }

    #[test]
    fn unsupported_tensor_type_names_type_and_tensor() {
        let g = kiln_gguf::GgufFile::open(synth("F32")).unwrap();
        let mut b = kiln_gguf::GgufBuilder::from_file(&g);
        let ty = kiln_gguf::GgmlType::IQ2_XXS;
        for t in b.tensors.iter_mut().filter(|t| t.name == "blk.0.attn_q.weight") {
            let n: u64 = t.dims.iter().product();
            t.type_id = ty.id();
            t.data = vec![0; ty.bytes_for(n).unwrap() as usize];
            t.offset = None;
        }
        for t in b.tensors.iter_mut() {
            t.offset = None;
        }
        let p = tmp("iq2.gguf", &b.to_bytes());
        let o = kiln(&["run", "-m", p.to_str().unwrap(), "--tokens", "1,2"]);
        assert_one_line_error(&o, "IQ2_XXS");
        assert!(stderr(&o).contains("blk.0.attn_q.weight"), "{}", stderr(&o));
        // inspect still shows such a file.
        let o = kiln(&["inspect", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("IQ2_XXS"));
    }

    #[test]
    fn invalid_utf8_on_stdin() {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["tokenize", "-m", synth("F32").to_str().unwrap(), "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"abc\xff\xfedef").unwrap();
        let o = child.wait_with_output().unwrap();
        assert_one_line_error(&o, "UTF-8");
    }
}

/// The REPL: two turns, /reset, /raw and /exit from piped stdin.
#[test]
fn chat_repl_runs_turns_and_commands() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "-m", synth("Q8_0").to_str().unwrap(), "-n", "4", "--temp", "0", "--system", "Be brief."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\nAnd again\n/reset\n/raw\nraw text\n/exit\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// Sampling with the same seed and inputs gives the same text; stop strings cut the output.
#[test]
fn seeded_sampling_is_reproducible() {
    let m = synth("Q4_K");
    let args = [
        "run",
        "-m",
        m.to_str().unwrap(),
        "--tokens",
        "1,415,300",
        "-n",
        "24",
        "--temp",
        "1.0",
        "--seed",
        "7",
        "--ignore-eos",
    ];
    let a = kiln(&args);
    let b = kiln(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    let mut other = args.to_vec();
    let k = other.len() - 2;
    other[k] = "8";
    let c = kiln(&other);
    assert!(c.status.success(), "{}", stderr(&c));
    // Stop strings: cut before the first occurrence of a piece of the seeded output.
    let text = stdout(&a);
    let chars: Vec<char> = text.trim_end_matches('\n').chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..6].iter().collect();
        let mut with_stop = args.to_vec();
        with_stop.extend(["--stop", stop.as_str()]);
        let d = kiln(&with_stop);
        assert!(d.status.success(), "{}", stderr(&d));
        let cut = text.find(&stop).unwrap();
        assert_eq!(stdout(&d), format!("{}\n", &text[..cut]));
    }
}

/// `kiln run --json-schema FILE` / `--grammar FILE`: the output belongs to the schema's or the
/// grammar's language, on the synth Qwen2 (byte-level BPE vocabulary), greedy and sampled; what
/// cannot be enforced is an error before anything is generated.
mod constrained {
    use super::*;

    /// A file under the temporary folder, removed when dropped.
    struct TmpFile(PathBuf);

    impl TmpFile {
        fn new(tag: &str, text: &str) -> TmpFile {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let p = std::env::temp_dir().join(format!("kiln-cli-constrained-{}-{n}-{tag}", std::process::id()));
            std::fs::write(&p, text).unwrap();
            TmpFile(p)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TmpFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn qwen2() -> String {
        synth_arch("qwen2-tiny-Q8_0").to_str().unwrap().to_string()
    }

    const SCHEMA: &str = r#"{
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
            "word": {"type": "string", "maxLength": 6}
        },
        "required": ["answer", "count", "ok"],
        "additionalProperties": false
    }"#;

    /// Checks SCHEMA by hand.
    fn check(json: &str, ctx: &str) {
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {json:?}"));
        let o = v.as_object().unwrap_or_else(|| panic!("{ctx}: not an object: {json}"));
        for k in o.keys() {
            assert!(["answer", "count", "ok", "word"].contains(&k.as_str()), "{ctx}: extra key {k}: {json}");
        }
        let answer = o.get("answer").and_then(|a| a.as_str()).unwrap_or_else(|| panic!("{ctx}: answer: {json}"));
        assert!(["yes", "no", "maybe"].contains(&answer), "{ctx}: answer {answer:?} not in the enum: {json}");
        let count = o.get("count").and_then(|c| c.as_u64()).unwrap_or_else(|| panic!("{ctx}: count: {json}"));
        assert!(count <= 9, "{ctx}: count {count}: {json}");
        assert!(o.get("ok").is_some_and(|b| b.is_boolean()), "{ctx}: ok: {json}");
        if let Some(w) = o.get("word") {
            let w = w.as_str().unwrap_or_else(|| panic!("{ctx}: word: {json}"));
            assert!(w.chars().count() <= 6, "{ctx}: word {w:?}: {json}");
        }
    }

    /// The sampling flags each positive case runs under.
    fn samplings() -> Vec<Vec<&'static str>> {
        let mut v = vec![vec!["--temp", "0"]];
        for seed in ["1", "2", "3"] {
            v.push(vec!["--temp", "1", "--seed", seed]);
        }
        v
    }

    /// Runs `kiln run` on the synth Qwen2 with a raw prompt and `extra` flags.
    fn run(extra: &[&str]) -> Output {
        let m = qwen2();
        kiln(&[&["run", "-m", m.as_str(), "--raw", "Answer:", "-n", "96"][..], extra].concat())
    }

    /// The generated text (stdout less its final newline) of a successful run ended by the
    /// constraint, whose stderr reports the compile time of `kind`.
    fn output(o: &Output, kind: &str, ctx: &str) -> String {
        let err = stderr(o);
        assert!(o.status.success(), "{ctx}: {err}");
        assert!(err.contains("kiln: constraint vocabulary "), "{ctx}: {err}");
        assert!(err.contains(&format!(" ms | {kind} compiled in ")), "{ctx}: {err}");
        assert!(err.contains("stop: Stop"), "{ctx}: not ended by the constraint: {err}");
        let out = stdout(o);
        out.strip_suffix('\n').unwrap_or_else(|| panic!("{ctx}: no final newline: {out:?}")).to_string()
    }

    #[test]
    fn run_json_schema_prints_json_meeting_the_schema() {
        let schema = TmpFile::new("schema.json", SCHEMA);
        for s in samplings() {
            let ctx = format!("{s:?}");
            let o = run(&[&["--json-schema", schema.path()][..], &s].concat());
            let json = output(&o, "json_schema", &ctx);
            check(&json, &ctx);
            if s.len() > 2 {
                // Seeded: the same output again.
                let again = run(&[&["--json-schema", schema.path()][..], &s].concat());
                assert_eq!(stdout(&again), stdout(&o), "{ctx}");
            }
        }
    }

    #[test]
    fn run_grammar_gbnf_and_lark() {
        let gbnf = TmpFile::new(
            "yes-no.gbnf",
            "# yes or no, a dot, three digits\nroot ::= (\"yes\" | \"no\") \".\" digit{3}\ndigit ::= [0-9]\n",
        );
        let lark = TmpFile::new("ab.lark", "%llguidance {}\nstart: \"a\"+ \"b\"\n");
        for s in samplings() {
            let ctx = format!("GBNF {s:?}");
            let text = output(&run(&[&["--grammar", gbnf.path()][..], &s].concat()), "grammar", &ctx);
            let rest = text.strip_prefix("yes").or_else(|| text.strip_prefix("no"));
            let digits = rest.and_then(|r| r.strip_prefix('.'));
            assert!(
                digits.is_some_and(|d| d.len() == 3 && d.bytes().all(|b| b.is_ascii_digit())),
                "{ctx}: {text:?} is not (yes|no).[0-9]{{3}}"
            );
            let ctx = format!("Lark {s:?}");
            let text = output(&run(&[&["--grammar", lark.path()][..], &s].concat()), "lark grammar", &ctx);
            let a = text.strip_suffix('b').unwrap_or_else(|| panic!("{ctx}: {text:?} is not a+b"));
            assert!(!a.is_empty() && a.bytes().all(|b| b == b'a'), "{ctx}: {text:?} is not a+b");
        }
    }

    /// A schema or grammar that cannot be enforced: a one-line error naming the file and the
    /// reason, nothing on stdout.
    #[test]
    fn run_bad_schema_or_grammar_is_an_error() {
        let cases: Vec<(&str, &str, &str, Vec<&str>)> = vec![
            ("--json-schema", "objekt.json", r#"{"type": "objekt"}"#, vec!["the json_schema cannot be enforced: "]),
            (
                "--json-schema",
                "unique.json",
                r#"{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}"#,
                vec!["the json_schema cannot be enforced: ", "uniqueItems"],
            ),
            ("--json-schema", "notjson.json", "{\"type\": ", vec!["not JSON"]),
            (
                "--grammar",
                "syntax.gbnf",
                "root ::= \"a\" item\nitem ::= [a-z\n",
                vec!["the grammar cannot be enforced: line 2, column 10: unterminated character class"],
            ),
            (
                "--grammar",
                "undefined.gbnf",
                "root ::= \"x\" item\n",
                vec!["the grammar cannot be enforced: line 1, column 14: undefined rule `item`"],
            ),
            ("--grammar", "noroot.gbnf", "item ::= \"x\"\n", vec!["the grammar cannot be enforced: ", "root"]),
            ("--grammar", "bad.lark", "%llguidance {}\nstart: \"a\" nothing\n", vec!["cannot be enforced: "]),
        ];
        for (flag, name, text, needles) in cases {
            let f = TmpFile::new(name, text);
            let o = run(&[flag, f.path(), "--temp", "0"]);
            assert_one_line_error(&o, needles[0]);
            for n in &needles {
                assert!(stderr(&o).contains(n), "{name}: {n:?} not in {}", stderr(&o));
            }
            assert!(stderr(&o).contains(f.path()), "{name}: the file is named: {}", stderr(&o));
            assert_eq!(stdout(&o), "", "{name}: nothing generated");
        }
        // A file that is not there.
        let gone = std::env::temp_dir().join(format!("kiln-cli-constrained-{}-missing.gbnf", std::process::id()));
        let o = run(&["--grammar", gone.to_str().unwrap()]);
        assert_one_line_error(&o, gone.to_str().unwrap());
        assert_eq!(stdout(&o), "");
    }

    #[test]
    fn run_json_schema_conflicts_with_grammar() {
        let schema = TmpFile::new("schema.json", SCHEMA);
        let gbnf = TmpFile::new("g.gbnf", "root ::= \"x\"\n");
        let o = run(&["--json-schema", schema.path(), "--grammar", gbnf.path()]);
        assert_one_line_error(&o, "cannot be used with");
        assert!(stderr(&o).contains("--json-schema") && stderr(&o).contains("--grammar"), "{}", stderr(&o));
        assert_eq!(stdout(&o), "");
    }
}
