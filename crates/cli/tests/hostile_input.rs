//! The `kiln` binary on hostile input: absurd sizes, files that are not files, files changed
//! underneath, broken hyper-parameters and weights, absurd thread counts. Each case ends in a
//! one-line error and exit status 1 (never a panic, an abort or a hang), or runs with a warning.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_gguf::{GgufBuilder, GgufFile, Value};

fn shared() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    assert!(d.is_dir(), "{} is missing: the shared fixtures are required", d.display());
    d
}

fn synth(name: &str) -> PathBuf {
    shared().join("models/synth").join(format!("synth-{name}.gguf"))
}

fn tiny() -> String {
    synth("tiny-F32").to_str().unwrap().to_string()
}

/// Generous: a case that hangs fails here instead of holding CI.
const DEADLINE: Duration = Duration::from_secs(60);

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln")
}

/// Runs kiln to the end, killing it (and failing) past [`DEADLINE`].
fn kiln(args: &[&str]) -> Output {
    wait(spawn(args), args)
}

fn wait(mut child: Child, what: &[&str]) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("waiting for kiln").is_some() {
            return child.wait_with_output().expect("kiln's output");
        }
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().expect("kiln's output");
            panic!("kiln {what:?} still ran after {DEADLINE:?}; stderr: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status 1 with exactly one line on stderr, `kiln: error: …` containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit status 1; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("kiln: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("kiln-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// synth-tiny-F32 edited by `edit`, written under `dir`.
fn edited(dir: &Scratch, name: &str, edit: impl FnOnce(&mut GgufBuilder)) -> String {
    let mut b = GgufBuilder::from_file(&GgufFile::open(synth("tiny-F32")).unwrap());
    edit(&mut b);
    let p = dir.path(name);
    b.write(&p).unwrap();
    p.to_str().unwrap().to_string()
}

fn kv_bytes(n_ctx: usize) -> Option<u64> {
    let cfg = kiln_model::ModelConfig::from_gguf(&GgufFile::open(synth("tiny-F32")).unwrap()).unwrap();
    kiln_model::kv_cache_bytes(&cfg, n_ctx)
}

/// `--ctx 2^62` used to panic (a KV size that wrapped around) and `--ctx 10^8` to abort on a
/// failed allocation: both are one-line errors naming the size, for every command that takes a
/// context size from a flag.
#[test]
fn huge_context_sizes_are_one_line_errors() {
    let m = tiny();
    let huge = (1u64 << 62).to_string();
    for args in [
        vec!["run", "-m", &m, "--tokens", "1,2", "-n", "1", "--ctx", &huge],
        vec!["chat", "-m", &m, "--ctx", &huge],
        vec!["bench", "-m", &m, "-p", "0", "-n", &huge, "-r", "1"],
    ] {
        let o = kiln(&args);
        assert_one_line_error(&o, "overflows the address space");
    }
    let o = kiln(&["run", "-m", &m, "--tokens", "1,2", "-n", "1", "--ctx", &huge]);
    assert_one_line_error(&o, &format!("--ctx {huge}: a context of {huge} positions is too large: its KV cache ("));

    // Sizes that have a size but not the memory: 10^8 positions, and twice what is available now
    // (always too much). Where 10^8 fits, it runs: the cache is only committed as it fills.
    let available = kiln_model::available_memory().expect("MemAvailable (Linux)");
    let twice = (2 * available / kv_bytes(1).unwrap() + 1) as usize;
    for n_ctx in [100_000_000usize, twice] {
        let ctx = n_ctx.to_string();
        let o = kiln(&["run", "-m", &m, "--tokens", "1,2", "-n", "1", "--temp", "0", "--ctx", &ctx]);
        if kv_bytes(n_ctx).unwrap() > available {
            assert_one_line_error(&o, &format!("--ctx {ctx}: a context of {ctx} positions needs "));
            assert!(stderr(&o).contains("of KV cache (") && stderr(&o).contains("of memory are available"));
        } else {
            assert!(o.status.success(), "--ctx {ctx}: {}", stderr(&o));
        }
    }
    let t = twice.to_string();
    let o = kiln(&["bench", "-m", &m, "-p", "0", "-n", &t, "-r", "1"]);
    assert_one_line_error(&o, &format!("-p 0 -n {t}: a context of {t} positions needs "));
}

/// `dump`/`diff` keep every activation of a pass, the attention weights growing with the square of
/// the tokens: a token list whose capture would take twice the memory available is refused before
/// anything runs.
#[test]
fn capturing_more_activations_than_memory_is_refused() {
    let cfg = kiln_model::ModelConfig::from_gguf(&GgufFile::open(synth("tiny-F32")).unwrap()).unwrap();
    let available = kiln_model::available_memory().expect("MemAvailable (Linux)");
    let n = ((2 * available / (cfg.n_layer * cfg.n_head * 4) as u64) as f64).sqrt() as usize + 1;
    let tokens = vec!["5"; n].join(",");
    let m = tiny();
    for cmd in ["dump", "diff"] {
        let mut args = vec![cmd, "-m", &m, "--tokens", &tokens];
        if cmd == "dump" {
            args.push("--stats");
        }
        let o = kiln(&args);
        assert_one_line_error(&o, &format!("--tokens ({n} tokens): the KV cache, the logits of {n} positions"));
        assert!(stderr(&o).contains("and the activations kept would take "), "{}", stderr(&o));
    }
}

/// Every model-reading command refuses a FIFO at once (it used to wait for a writer forever), and
/// a directory with its kind named once.
#[test]
fn fifo_and_directory_model_paths_are_refused() {
    let dir = Scratch::new("fifo");
    let fifo = dir.path("model.gguf");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let fifo = fifo.to_str().unwrap();
    let d = dir.0.to_str().unwrap();
    for args in [
        vec!["run", "-m", fifo, "hi"],
        vec!["inspect", fifo],
        vec!["tokenize", "-m", fifo, "hi"],
        vec!["template", "-m", fifo],
        vec!["logits", "-m", fifo, "--tokens", "1"],
    ] {
        assert_one_line_error(&kiln(&args), &format!("kiln: error: {fifo} is not a regular file (a FIFO)"));
    }
    for args in [vec!["run", "-m", d, "hi"], vec!["inspect", d], vec!["tokenize", "-m", d, "hi"]] {
        let o = kiln(&args);
        assert_one_line_error(&o, &format!("kiln: error: {d} is not a regular file (a directory)"));
        assert_eq!(stderr(&o).matches("directory").count(), 1, "{}", stderr(&o));
        assert_eq!(stderr(&o).matches(d).count(), 1, "{}", stderr(&o));
    }
}

/// A NaN among the weights: refused at load with the tensor and count named; loaded with
/// `--allow-nonfinite` (and a warning); listed by `inspect --check` (exit status 3).
#[test]
fn non_finite_weights() {
    let dir = Scratch::new("nan");
    let nan = edited(&dir, "nan.gguf", |b| {
        let t = b.tensors.iter_mut().find(|t| t.name == "blk.0.attn_q.weight").unwrap();
        t.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        let t = b.tensors.iter_mut().find(|t| t.name == "output_norm.weight").unwrap();
        t.data[..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    });
    let expected = "2 tensors have non-finite values: \"blk.0.attn_q.weight\" has 1 non-finite value (1 NaN, 0 \
                    infinite), \"output_norm.weight\" has 1 non-finite value (0 NaN, 1 infinite); --allow-nonfinite \
                    to load anyway";
    for args in [
        vec!["run", "-m", &nan, "--tokens", "1,2", "-n", "1"],
        vec!["run", "-m", &nan, "--tokens", "1,2", "-n", "1", "--mmap"],
        vec!["logits", "-m", &nan, "--tokens", "1,2"],
        vec!["bench", "-m", &nan, "-p", "4", "-n", "0", "-r", "1"],
        vec!["dump", "-m", &nan, "--tokens", "1,2", "--stats"],
        vec!["diff", "-m", &nan, "--tokens", "1,2"],
        vec!["chat", "-m", &nan],
    ] {
        assert_one_line_error(&kiln(&args), &format!("kiln: error: {nan}: {expected}"));
    }
    let o = kiln(&["run", "-m", &nan, "--tokens", "1,2", "-n", "1", "--temp", "0", "--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!("kiln: warning: {nan}: 2 tensors have non-finite values")),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("loading anyway (--allow-nonfinite)"), "{}", stderr(&o));

    let o = kiln(&["inspect", "--check", &nan]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("check: 2 of "), "{out}");
    assert!(out.contains("blk.0.attn_q.weight  F32     1 NaN, 0 infinite of "), "{out}");
    assert!(out.contains("output_norm.weight   F32     0 NaN, 1 infinite of 256 values"), "{out}");
    let o = kiln(&["inspect", "--check", "--json", &nan]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let bad = v["check"]["nonfinite"].as_array().unwrap();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0]["name"], "blk.0.attn_q.weight");
    assert_eq!((bad[0]["nan"].as_u64(), bad[0]["inf"].as_u64()), (Some(1), Some(0)));
    assert_eq!(bad[0]["type"], "F32");

    // A clean file: exit 0, and the check says so. Without --check, inspect shows a bad file too.
    let o = kiln(&["inspect", "--check", &tiny()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("check: every value of the "), "{}", stdout(&o));
    assert!(kiln(&["inspect", &nan]).status.success());
}

/// Hyper-parameters out of range and undefined token types are refused at load, naming the key.
#[test]
fn bad_hyper_parameters_are_refused() {
    let dir = Scratch::new("hparams");
    let cases: Vec<(String, &str)> = vec![
        (
            edited(&dir, "eps.gguf", |b| {
                b.set_kv("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::INFINITY));
            }),
            "invalid hyper-parameters: llama: llama.attention.layer_norm_rms_epsilon = inf must be finite",
        ),
        (
            edited(&dir, "base.gguf", |b| {
                b.set_kv("llama.rope.freq_base", Value::F32(f32::INFINITY));
            }),
            "llama.rope.freq_base = inf must be finite and positive",
        ),
        (
            edited(&dir, "scale-nan.gguf", |b| {
                b.set_kv("llama.rope.scaling.type", Value::String("linear".into()));
                b.set_kv("llama.rope.scaling.factor", Value::F32(f32::NAN));
            }),
            "llama.rope.scaling.factor = NaN must be finite and positive",
        ),
        (
            edited(&dir, "scale-0.gguf", |b| {
                b.set_kv("llama.rope.scaling.type", Value::String("linear".into()));
                b.set_kv("llama.rope.scaling.factor", Value::F32(0.0));
            }),
            "llama.rope.scaling.factor = 0 must be finite and positive",
        ),
        (
            edited(&dir, "layers.gguf", |b| {
                b.set_kv("llama.block_count", Value::U64(1 << 40));
            }),
            "llama.block_count = 1099511627776 is implausibly large",
        ),
        (
            edited(&dir, "toktype.gguf", |b| {
                let Some((_, Value::Array(a))) = b.metadata.iter_mut().find(|(k, _)| k == "tokenizer.ggml.token_type")
                else {
                    panic!("synth-tiny has token types")
                };
                a.items[5] = Value::I32(99);
            }),
            "tokenizer.ggml.token_type: token 5 has type 99, which GGUF does not define",
        ),
    ];
    for (path, needle) in &cases {
        let o = kiln(&["run", "-m", path, "--tokens", "1,2", "-n", "1"]);
        assert_one_line_error(&o, needle);
        assert!(stderr(&o).starts_with(&format!("kiln: error: {path}: ")), "{}", stderr(&o));
    }
    // The token type is refused by everything that reads the file.
    let toktype = &cases[5].0;
    assert_one_line_error(&kiln(&["tokenize", "-m", toktype, "hi"]), "token 5 has type 99");
    assert_one_line_error(&kiln(&["inspect", toktype]), "token 5 has type 99");
}

/// More threads than cores runs, with a warning; an absurd count is refused.
#[test]
fn thread_counts() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let over = (cores + 1).to_string();
    let o = kiln(&["run", "-m", &tiny(), "--tokens", "1,2", "-n", "2", "--temp", "0", "-t", &over]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .starts_with(&format!("kiln: warning: -t {over} starts more threads than the {cores} available cores")),
        "{}",
        stderr(&o)
    );
    // One per core, or fewer: no warning.
    let o = kiln(&["run", "-m", &tiny(), "--tokens", "1,2", "-n", "2", "--temp", "0", "-t", "1"]);
    assert!(o.status.success() && !stderr(&o).contains("warning"), "{}", stderr(&o));
    // The issue's -t 1000 (below the cap of 1024): warned, and it still runs.
    let o = kiln(&["run", "-m", &tiny(), "--tokens", "1,2", "-n", "1", "--temp", "0", "-t", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("kiln: warning: -t 1000 starts more threads than the "), "{}", stderr(&o));
    assert_one_line_error(&kiln(&["run", "-m", &tiny(), "hi", "-t", "5000"]), "-t 5000: at most 1024 threads");
}

/// Empty text without BOS is no tokens on SentencePiece and BPE vocabularies alike (llama.cpp: `[]`).
#[test]
fn tokenize_empty_text_without_bos() {
    for m in ["tiny-F32", "gemma3-tiny-Q8_0", "qwen2-tiny-Q8_0", "qwen3-tiny-Q8_0"] {
        let o = kiln(&["tokenize", "-m", synth(m).to_str().unwrap(), "--no-bos", ""]);
        assert!(o.status.success(), "{m}: {}", stderr(&o));
        assert_eq!(stdout(&o), "\n", "{m}");
    }
}

/// Collects a child's stderr on a thread, so the test can wait for a text without blocking.
struct StderrWatch(std::sync::Arc<std::sync::Mutex<String>>);

impl StderrWatch {
    fn new(child: &mut Child) -> StderrWatch {
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let t = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        StderrWatch(text)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until stderr holds `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) {
        let t0 = Instant::now();
        while self.text().matches(needle).count() < times {
            assert!(t0.elapsed() < DEADLINE, "no {needle:?} on stderr: {}", self.text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end; its exit status and everything it wrote to stderr.
    fn finish(&self, child: &mut Child) -> (Option<i32>, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("kiln did not exit; stderr: {}", self.text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader thread sees the end of the pipe soon after the exit.
        let t0 = Instant::now();
        while Arc::strong_count(&self.0) > 1 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        (status.code(), self.text())
    }
}

use std::sync::Arc;

/// `kiln chat --mmap` on a copy of the model that is rewritten in place, or truncated, between two
/// turns: the next turn ends the session with a one-line error naming the change, instead of
/// answering from garbage weights (or dying of SIGBUS without a word).
#[test]
fn mapped_model_changed_between_chat_turns() {
    for (change, expected) in [("rewrite", "modified in place"), ("truncate", "truncated from ")] {
        let dir = Scratch::new(&format!("chat-{change}"));
        let p = dir.path("model.gguf");
        std::fs::copy(synth("tiny-Q8_0"), &p).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["chat", "-m", p.to_str().unwrap(), "--mmap", "-n", "2", "--temp", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let watch = StderrWatch::new(&mut child);
        let mut stdin = child.stdin.take().unwrap();
        watch.wait_for("> ", 1);
        stdin.write_all(b"hello\n").unwrap();
        stdin.flush().unwrap();
        // The first turn answered from the intact file and printed the next prompt.
        watch.wait_for("> ", 2);
        let len = std::fs::metadata(&p).unwrap().len();
        let before = std::fs::metadata(&p).unwrap().modified().unwrap();
        match change {
            "rewrite" => {
                // Same size, new bytes at the end (weights), until the modification time moves.
                let t0 = Instant::now();
                while std::fs::metadata(&p).unwrap().modified().unwrap() == before {
                    use std::io::{Seek, SeekFrom};
                    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                    f.seek(SeekFrom::End(-64)).unwrap();
                    f.write_all(&[0x7f; 64]).unwrap();
                    assert!(t0.elapsed() < DEADLINE, "modification time never changed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            _ => std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap(),
        }
        stdin.write_all(b"again\n").unwrap();
        drop(stdin);
        let (code, err) = watch.finish(&mut child);
        assert_eq!(code, Some(1), "{change}: {err}");
        // What came after the last prompt ("> ", no newline): the error, on one line.
        let last = err.rsplit("> ").next().unwrap_or_default();
        assert_eq!(last.lines().count(), 1, "{change}: {err}");
        assert!(
            last.starts_with(&format!(
                "kiln: error: the model file {} changed while kiln had it mapped (",
                p.display()
            )),
            "{change}: {err}"
        );
        assert!(last.contains(expected), "{change}: {err}");
    }
}

/// `kiln run --mmap` whose model file is truncated while it generates: the read of a lost page
/// raises SIGBUS, and kiln says so on one line and exits with status 135 (it used to die without a
/// word).
#[test]
fn mapped_model_truncated_during_generation() {
    let dir = Scratch::new("sigbus");
    let p = dir.path("model.gguf");
    std::fs::copy(synth("tiny-Q8_0"), &p).unwrap();
    let data_offset = GgufFile::open(&p).unwrap().data_offset;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "-m", p.to_str().unwrap(), "--mmap", "--tokens", "1,2", "--temp", "0", "--ignore-eos"])
        .args(["--ctx", "1000000", "-n", "999000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watch = StderrWatch::new(&mut child);
    // Generation has started once text comes out.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    assert_eq!(out.read(&mut first).unwrap(), 1, "no output: {}", watch.text());
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(data_offset).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let (code, err) = watch.finish(&mut child);
    assert_eq!(code, Some(135), "{err}");
    assert!(
        err.ends_with(&format!("kiln: the model file {} changed while mapped (SIGBUS): exiting\n", p.display())),
        "{err}"
    );
}

/// The backend flags: `--backend cuda` where it cannot run (every CI build: no `cuda` feature; a
/// CUDA build on a machine without a driver) is one line saying why; `--exact` with `--backend
/// cuda` is refused (the exact path is CPU-only); `--kv-memory` sizes are checked before anything
/// loads, and the flag is refused when the server runs on the CPU.
#[test]
fn backend_flags_are_one_line_errors() {
    let m = tiny();
    let o = kiln(&["run", "-m", &m, "--backend", "cuda", "-n", "1", "hi"]);
    if o.status.success() {
        let _ = writeln!(std::io::stderr(), "SKIPPED backend_flags_are_one_line_errors (--backend cuda): a GPU ran it");
    } else {
        assert_one_line_error(&o, "--backend cuda");
    }
    let o = kiln(&["run", "-m", &m, "--backend", "cuda", "--exact", "-n", "1", "hi"]);
    assert_one_line_error(&o, "--exact runs on the CPU only");
    for bad in ["abc", "-5G", "0", "1e30G", "99999999999T", "8Q", ""] {
        let flag = format!("--kv-memory={bad}");
        let o = kiln(&["serve", "-m", &m, "--backend", "cpu", &flag, "--port", "0"]);
        assert_one_line_error(&o, "--kv-memory");
    }
    let o = kiln(&["serve", "-m", &m, "--backend", "cpu", "--kv-memory", "1G", "--port", "0"]);
    assert_one_line_error(&o, "--kv-memory sizes the GPU's KV cache");
}
