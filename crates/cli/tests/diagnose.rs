//! `kiln dump`, `kiln diff` and `kiln perplexity` end to end: injected faults are localized to
//! their first affected activation, the unfaulted default path agrees with the exact path on every
//! synth model, dump directories (kiln's and llama.cpp-named) are read back, KL divergence from
//! saved logits matches `kiln parity`, and bad input gets one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_engine::diagnose::npy;

fn shared() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    assert!(d.is_dir(), "{} is missing: the shared fixtures are required", d.display());
    d
}

fn synth(name: &str) -> PathBuf {
    shared().join("models/synth").join(format!("synth-tiny-{name}.gguf"))
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("running kiln")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-diag-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A failed run with exactly one line on stderr, `kiln: error: …` containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("kiln: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

const TOKENS: &str = "1,15,100,200,300,400,500,600";
/// `kiln diff`'s exit status when it finds a divergence.
const EXIT_DIVERGED: i32 = 3;

/// The name on the "first divergence:" line, or None for "agreement".
fn first_divergence(o: &Output) -> Option<String> {
    let out = stdout(o);
    if let Some(line) = out.lines().find(|l| l.starts_with("first divergence: ")) {
        assert_eq!(o.status.code(), Some(EXIT_DIVERGED), "{out}{}", stderr(o));
        return Some(line["first divergence: ".len()..].split_whitespace().next().unwrap().to_string());
    }
    assert!(out.lines().any(|l| l.starts_with("agreement: ")), "no verdict: {out}{}", stderr(o));
    assert!(o.status.success(), "{out}{}", stderr(o));
    None
}

fn diff_with_fault(model: &Path, fault: &str) -> Option<String> {
    let o = kiln(&["diff", "-m", model.to_str().unwrap(), "--tokens", TOKENS, "--inject-fault", fault]);
    first_divergence(&o)
}

#[test]
fn no_fault_agrees_on_every_synth_model() {
    let mut models: Vec<PathBuf> = std::fs::read_dir(shared().join("models/synth"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    models.sort();
    assert!(models.len() >= 17, "{models:?}");
    for m in &models {
        let o = kiln(&["diff", "-m", m.to_str().unwrap(), "--tokens", TOKENS]);
        assert_eq!(first_divergence(&o), None, "{}: {}", m.display(), stdout(&o));
        // The per-layer table: one row per layer of the 2-layer synth models.
        let out = stdout(&o);
        assert!(out.lines().any(|l| l.starts_with("layer ")) && out.contains("\n    1 "), "{out}");
    }
}

#[test]
fn fault_rope_pairing_is_found_at_q_rope_0() {
    for m in ["F32", "Q8_0", "Q4_K"] {
        assert_eq!(diff_with_fault(&synth(m), "rope-pairing").as_deref(), Some("q_rope-0"), "{m}");
    }
}

#[test]
fn fault_transposed_lm_head_is_found_at_logits() {
    for m in ["F32", "Q8_0", "Q4_K"] {
        assert_eq!(diff_with_fault(&synth(m), "transposed-lm-head").as_deref(), Some("logits"), "{m}");
    }
}

#[test]
fn fault_no_rms_eps_is_found_at_attn_norm_0() {
    for m in ["F32", "Q8_0", "Q4_K"] {
        assert_eq!(diff_with_fault(&synth(m), "no-rms-eps").as_deref(), Some("attn_norm-0"), "{m}");
    }
}

#[test]
fn fault_f16_matmul_is_found_at_q_0() {
    // Q4_K and Q5_K are left out: there the default path's own rounding of q-0's input is within
    // 1.2x of the f16 rounding's effect (README, "Finding the first wrong operation").
    for m in ["F32", "Q8_0", "Q6_K"] {
        assert_eq!(diff_with_fault(&synth(m), "f16-matmul").as_deref(), Some("q-0"), "{m}");
    }
}

#[test]
fn divergence_report_names_worst_positions_and_elements() {
    let o = kiln(&["diff", "-m", synth("F32").to_str().unwrap(), "--tokens", TOKENS, "--inject-fault", "rope-pairing"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(EXIT_DIVERGED), "{out}");
    // Position 0 is not rotated, so the faulty pairing cannot show there: the worst positions are later.
    let worst = out.lines().find(|l| l.trim_start().starts_with("worst positions:")).expect("worst positions");
    assert!(!worst.contains("[token 0]") || worst.trim_end().ends_with("[token 0] 0.00e0;"), "{worst}");
    assert!(out.contains("worst elements:") && out.contains("ours ") && out.contains("reference "), "{out}");
    assert!(out.contains("q_rope-0 (shape 8x"), "{out}");
}

#[test]
fn default_model_agrees_and_localizes_faults() {
    let Ok(model) = kiln_engine::default_model::ensure() else {
        eprintln!("SKIPPED: the default model could not be fetched");
        return;
    };
    let m = model.to_str().unwrap();
    let tokens = "504,1573,33059,40061,13197,6351,1683,260";
    assert_eq!(first_divergence(&kiln(&["diff", "-m", m, "--tokens", tokens])), None);
    for (fault, at) in [("rope-pairing", "q_rope-0"), ("no-rms-eps", "attn_norm-0"), ("f16-matmul", "q-0")] {
        let o = kiln(&["diff", "-m", m, "--tokens", tokens, "--inject-fault", fault]);
        assert_eq!(first_divergence(&o).as_deref(), Some(at), "{fault}");
    }
}

#[test]
fn dump_writes_npy_files_and_index() {
    let dir = tmp("dump");
    let m = synth("Q8_0");
    let o = kiln(&[
        "dump",
        "-m",
        m.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--layers",
        "1",
        "--ops",
        "q_rope,kq_soft_max,logits",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["tokens"], serde_json::json!([1, 2, 3]));
    let names: Vec<&str> =
        index["activations"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["q_rope-1", "kq_soft_max-1", "logits"]);
    // synth-tiny: n_embd 256, 4 heads, vocab 1024.
    let q = npy::read(&dir.join("q_rope-1.npy")).unwrap();
    assert_eq!(q.shape, [3, 256]);
    let w = npy::read(&dir.join("kq_soft_max-1.npy")).unwrap();
    assert_eq!(w.shape, [12, 3]);
    // Causal softmax rows sum to one; token 0 attends only to itself.
    for row in w.data.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    assert_eq!(&w.data[..3], &[1.0, 0.0, 0.0]);
    assert_eq!(npy::read(&dir.join("logits.npy")).unwrap().shape, [3, 1024]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dump_stats_prints_one_row_per_activation() {
    let o = kiln(&["dump", "-m", synth("F32").to_str().unwrap(), "--tokens", "1,2,3", "--stats"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("rms") && lines[0].contains("nan") && lines[0].contains("inf"), "{out}");
    // token_embd, 16 per layer × 2 layers, output_norm, logits.
    assert_eq!(lines.len(), 1 + 1 + 32 + 2, "{out}");
    let attn_norm = lines.iter().find(|l| l.starts_with("0     attn_norm")).unwrap();
    let rms: f64 = attn_norm.split_whitespace().nth(3).unwrap().parse().unwrap();
    // RMSNorm output: RMS about the RMS of the norm weights (synth: around 1).
    assert!(rms > 0.5 && rms < 2.0, "{attn_norm}");
}

#[test]
fn dump_bad_filters_are_clear_errors() {
    let m = synth("F32");
    let m = m.to_str().unwrap();
    let o = kiln(&["dump", "-m", m, "--tokens", "1,2", "--ops", "q,qk_rope", "--stats"]);
    assert_one_line_error(
        &o,
        "unknown op name \"qk_rope\" (valid: token_embd, attn_norm, q, k, v, q_norm, k_norm, q_rope",
    );
    let o = kiln(&["dump", "-m", m, "--tokens", "1,2", "--layers", "0,2", "--stats"]);
    assert_one_line_error(&o, "layer 2 is out of range: the model has 2 layers (0..=1)");
    let o = kiln(&["dump", "-m", m, "--tokens", "1,2"]);
    assert_one_line_error(&o, "--out DIR, --stats");
    let o = kiln(&["diff", "-m", m, "--tokens", "1,2", "--inject-fault", "nope"]);
    assert_one_line_error(&o, "unknown fault 'nope'");
}

#[test]
fn diff_against_a_kiln_dump_directory() {
    let dir = tmp("against");
    let m = synth("Q8_0");
    let m = m.to_str().unwrap();
    let o = kiln(&["dump", "-m", m, "--tokens", "5,6,7,8", "--exact", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = dir.to_str().unwrap();
    // Tokens come from the index.
    let o = kiln(&["diff", "-m", m, "--against", d]);
    assert_eq!(first_divergence(&o), None);
    let o = kiln(&["diff", "-m", m, "--against", d, "--inject-fault", "rope-pairing"]);
    assert_eq!(first_divergence(&o).as_deref(), Some("q_rope-0"));
    let o = kiln(&["diff", "-m", m, "--against", d, "--tokens", "5,6,7"]);
    assert_one_line_error(&o, "--tokens differ from the tokens in");

    // A shape in the index that disagrees with its file.
    let index = std::fs::read_to_string(dir.join("index.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&index).unwrap();
    v["activations"][2]["shape"] = serde_json::json!([4, 100]);
    std::fs::write(dir.join("index.json"), v.to_string()).unwrap();
    assert_one_line_error(
        &kiln(&["diff", "-m", m, "--against", d]),
        "activation q-0 has shape [4, 100] in index.json but [4, 256] in q-0.npy",
    );
    // A file of the wrong shape for the model.
    npy::write_f32(&dir.join("q-0.npy"), 4, 100, &[0.0; 400]).unwrap();
    assert_one_line_error(
        &kiln(&["diff", "-m", m, "--against", d]),
        "activation q-0: the reference has shape (4, 100) but the model gives (4, 256)",
    );
    // A missing file.
    std::fs::remove_file(dir.join("q-0.npy")).unwrap();
    assert_one_line_error(&kiln(&["diff", "-m", m, "--against", d]), "file q-0.npy of activation q-0 is missing");
    // An unknown name.
    v["activations"][2]["name"] = serde_json::json!("q_proj-0");
    std::fs::write(dir.join("index.json"), v.to_string()).unwrap();
    assert_one_line_error(&kiln(&["diff", "-m", m, "--against", d]), "unknown activation name \"q_proj-0\"");
    assert_one_line_error(&kiln(&["diff", "-m", m, "--against", "/nonexistent/dump"]), "does not exist");
    std::fs::remove_dir_all(&dir).ok();
}

/// A dump as a llama.cpp eval-callback converter would write it: llama.cpp names (Qcur/Kcur
/// twice: projection, then after RoPE), ggml layouts saved in C order (`kq_soft_max` as
/// `(n_head, n_tokens, n_kv)` with padded zero columns), tensors kiln has no counterpart for.
#[test]
fn diff_against_a_llama_cpp_named_dump() {
    let src = tmp("llama-src");
    let dir = tmp("llama");
    let m = synth("F32");
    let m = m.to_str().unwrap();
    let o = kiln(&["dump", "-m", m, "--tokens", "5,6,7,8", "--exact", "--out", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("index.json")).unwrap()).unwrap();
    fn llama_name(op: &str) -> &str {
        match op {
            "token_embd" => "inp_embd",
            "q" | "q_rope" => "Qcur",
            "k" | "k_rope" => "Kcur",
            "v" => "Vcur",
            "attn_out" => "kqv_out",
            "attn_proj" => "attn_out",
            "attn_residual" => "ffn_inp",
            "ffn_swiglu" => "ffn_gate_par",
            "ffn_down" => "ffn_out",
            "ffn_residual" => "l_out",
            "output_norm" => "result_norm",
            "logits" => "result_output",
            other => other,
        }
    }
    let (n_tok, n_head, n_kv_padded) = (4, 4, 32);
    let mut entries = Vec::new();
    for (i, a) in index["activations"].as_array().unwrap().iter().enumerate() {
        let op = a["op"].as_str().unwrap();
        let name = match a["layer"].as_u64() {
            Some(l) => format!("{}-{l}", llama_name(op)),
            None => llama_name(op).to_string(),
        };
        let arr = npy::read(&src.join(a["file"].as_str().unwrap())).unwrap();
        let file = format!("t{i}.npy");
        let shape: Vec<usize> = if op == "kq_soft_max" {
            // kiln (n_tokens·n_head, n_kv) -> ggml (n_head, n_tokens, n_kv padded).
            let mut out = vec![0f32; n_head * n_tok * n_kv_padded];
            for t in 0..n_tok {
                for h in 0..n_head {
                    let src_row = &arr.data[(t * n_head + h) * n_tok..(t * n_head + h + 1) * n_tok];
                    out[(h * n_tok + t) * n_kv_padded..][..n_tok].copy_from_slice(src_row);
                }
            }
            npy::write_f32_shape(&dir.join(&file), &[n_head, n_tok, n_kv_padded], &out).unwrap();
            vec![n_head, n_tok, n_kv_padded]
        } else if op == "q_rope" {
            // After RoPE llama.cpp's Qcur is [head_dim, n_head, n_tokens]: (n_tokens, n_head, head_dim).
            npy::write_f32_shape(&dir.join(&file), &[n_tok, n_head, 64], &arr.data).unwrap();
            vec![n_tok, n_head, 64]
        } else {
            npy::write_f32_shape(&dir.join(&file), &arr.shape, &arr.data).unwrap();
            arr.shape.clone()
        };
        entries.push(serde_json::json!({ "name": name, "shape": shape, "file": file }));
        if op == "attn_norm" {
            // llama.cpp's un-weighted norm: no kiln counterpart, skipped.
            npy::write_f32_shape(&dir.join(format!("n{i}.npy")), &arr.shape, &arr.data).unwrap();
            let layer = a["layer"].as_u64().unwrap();
            entries.insert(
                entries.len() - 1,
                serde_json::json!({ "name": format!("norm-{layer}"), "shape": arr.shape, "file": format!("n{i}.npy") }),
            );
        }
    }
    let llama_index = serde_json::json!({ "naming": "llama.cpp", "tokens": [5, 6, 7, 8], "activations": entries });
    std::fs::write(dir.join("index.json"), llama_index.to_string()).unwrap();
    let d = dir.to_str().unwrap();
    let o = kiln(&["diff", "-m", m, "--against", d]);
    assert_eq!(first_divergence(&o), None);
    assert!(stderr(&o).contains("skipped 2 reference tensors") && stderr(&o).contains("norm-0"), "{}", stderr(&o));
    assert!(stdout(&o).contains("agreement: all 35 activations"), "{}", stdout(&o));
    let o = kiln(&["diff", "-m", m, "--against", d, "--inject-fault", "rope-pairing"]);
    assert_eq!(first_divergence(&o).as_deref(), Some("q_rope-0"));
    // The exact path against its own dump: bit for bit.
    let o = kiln(&["diff", "-m", m, "--against", d, "--exact"]);
    assert!(stdout(&o).contains("(largest rel-L2 0.00e0)"), "{}", stdout(&o));
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(&dir).ok();
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// The "done when" check: KL of the default path against saved exact logits, over the parity
/// fixture's tokens, is the mean KL `kiln parity` reports (which uses the full truth at 2
/// positions per case and the exact path elsewhere).
#[test]
fn kl_base_matches_parity_mean_kl() {
    let dir = tmp("kl");
    let fixture = shared().join("fixtures/parity/synth-tiny-Q8_0.json");
    let fx = kiln_engine::parity::load_fixture(&fixture).unwrap();
    let lines: Vec<String> = fx
        .cases
        .iter()
        .map(|c| c.prompt_tokens.iter().chain(&c.continuation).map(|t| t.to_string()).collect::<Vec<_>>().join(","))
        .collect();
    let toks = dir.join("tokens.txt");
    std::fs::write(&toks, lines.join("\n")).unwrap();
    let base = dir.join("exact.logits");
    let m = synth("Q8_0");
    let (m, toks, base) = (m.to_str().unwrap(), toks.to_str().unwrap(), base.to_str().unwrap());
    let o = kiln(&["perplexity", "-m", m, "--tokens-file", toks, "--exact", "--save-logits", base, "--json"]);
    let exact = json(&o);
    let o = kiln(&["perplexity", "-m", m, "--tokens-file", toks, "--kl-base", base, "--json"]);
    let ours = json(&o);
    let kl = &ours["kl"];
    let positions: usize = fx.cases.iter().map(|c| c.prompt_tokens.len() + c.continuation.len()).sum();
    assert_eq!(kl["positions"].as_u64().unwrap() as usize, positions);
    let o = kiln(&[
        "parity",
        "--only",
        "synth-tiny-Q8_0.json",
        "--json",
        shared().join("fixtures/parity").to_str().unwrap(),
    ]);
    let parity = json(&o);
    let parity_kl = parity[0]["default"]["mean_kl"].as_f64().unwrap();
    let mean = kl["mean"].as_f64().unwrap();
    assert!(mean > 0.0 && parity_kl > 0.0, "{mean} {parity_kl}");
    assert!((mean / parity_kl - 1.0).abs() < 0.01, "kl-base mean KL {mean:e} vs parity {parity_kl:e}");
    assert_eq!(kl["top1"].as_f64().unwrap(), 1.0);
    assert!(kl["median"].as_f64().unwrap() <= kl["p99"].as_f64().unwrap());
    assert!(kl["p99"].as_f64().unwrap() <= kl["max"].as_f64().unwrap());
    // Same tokens, so the same perplexity to many digits.
    let (pe, pd) = (exact["perplexity"].as_f64().unwrap(), ours["perplexity"].as_f64().unwrap());
    assert!((pe / pd - 1.0).abs() < 1e-4, "{pe} {pd}");

    // A base from other tokens or another vocabulary is refused before any work.
    let other = dir.join("other.txt");
    std::fs::write(&other, lines.join("\n").replacen(',', ",7,", 1)).unwrap();
    let o = kiln(&["perplexity", "-m", m, "--tokens-file", other.to_str().unwrap(), "--kl-base", base]);
    assert_one_line_error(&o, "the base logits were computed on different tokens (chunk 0: token 1 is");
    let o = kiln(&["perplexity", "-m", m, "--tokens-file", toks, "--chunks", "2", "--kl-base", base]);
    assert_one_line_error(&o, "the base logits have 5 chunks, this run 2");
    std::fs::write(dir.join("bad.logits"), b"not logits").unwrap();
    let o =
        kiln(&["perplexity", "-m", m, "--tokens-file", toks, "--kl-base", dir.join("bad.logits").to_str().unwrap()]);
    assert_one_line_error(&o, "is not a kiln logits file");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn perplexity_bad_input() {
    let dir = tmp("ppl-bad");
    let m = synth("F32");
    let m = m.to_str().unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "Just a few words.").unwrap();
    let o = kiln(&["perplexity", "-m", m, "-f", short.to_str().unwrap(), "--ctx", "64"]);
    assert_one_line_error(&o, "fewer than one chunk of --ctx 64");
    let o = kiln(&["perplexity", "-m", m]);
    assert_one_line_error(&o, "give a text with -f FILE");
    let o = kiln(&["perplexity", "-m", m, "-f", dir.join("missing.txt").to_str().unwrap()]);
    assert_one_line_error(&o, "missing.txt");
    // A base of another vocabulary: synth F32 (1024 tokens) against SmolLM2-sized logits is the
    // real case; here a synth model's base read by the same model with another text suffices for
    // tokens, and the vocabulary check is covered by forging the header's n_vocab.
    let text = dir.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let base = dir.join("base.logits");
    let o = kiln(&[
        "perplexity",
        "-m",
        m,
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "32",
        "--save-logits",
        base.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut bytes = std::fs::read(&base).unwrap();
    let hdr_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[16..16 + hdr_len].to_vec()).unwrap();
    assert!(header.contains("\"n_vocab\":1024"), "{header}");
    let forged = header.replace("\"n_vocab\":1024", "\"n_vocab\":2048");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&(forged.len() as u64).to_le_bytes());
    out.extend_from_slice(forged.as_bytes());
    out.extend_from_slice(&bytes[16 + hdr_len..]);
    out.extend(std::iter::repeat_n(0u8, bytes.len() - 16 - hdr_len)); // twice the data for 2048
    std::fs::write(&base, &out).unwrap();
    let o = kiln(&[
        "perplexity",
        "-m",
        m,
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "32",
        "--kl-base",
        base.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "the base logits have a vocabulary of 2048");
    bytes.truncate(bytes.len() - 4);
    std::fs::write(&base, &bytes).unwrap();
    let o = kiln(&[
        "perplexity",
        "-m",
        m,
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "32",
        "--kl-base",
        base.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "truncated or corrupt");
    std::fs::remove_dir_all(&dir).ok();
}

/// SmolLM2 over a few KB of English prose: a finite perplexity in the range a 135M model gets on
/// plain narrative text (19.4 measured at --ctx 512 over the whole file; here 4 chunks of 128 to
/// keep the test short).
#[test]
fn default_model_perplexity_on_prose_is_plausible() {
    let Ok(_) = kiln_engine::default_model::ensure() else {
        eprintln!("SKIPPED: the default model could not be fetched");
        return;
    };
    let prose = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/prose.txt");
    let o = kiln(&["perplexity", "-f", prose.to_str().unwrap(), "--ctx", "128", "--chunks", "4", "--json"]);
    let v = json(&o);
    let ppl = v["perplexity"].as_f64().unwrap();
    let se = v["perplexity_stderr"].as_f64().unwrap();
    assert_eq!(v["chunks"], 4);
    assert_eq!(v["predicted_tokens"], 4 * 63);
    assert!(ppl.is_finite() && ppl > 5.0 && ppl < 60.0, "perplexity {ppl}");
    assert!(se > 0.0 && se < ppl / 2.0, "stderr {se}");
}

/// `parity --tensor-parallel 2`: the default path split over two ranks passes the parity bars
/// on a model with q/k/v biases and grouped KV heads (Qwen2) and on one with fewer KV heads than
/// ranks, post-norms and a GELU FFN (Gemma 3: its one KV head repeated on both ranks); a split
/// the model cannot take is skipped with the reason, not passed.
#[test]
fn parity_over_tensor_parallel_ranks() {
    let fixtures = shared().join("fixtures/parity");
    for only in ["synth-qwen2-tiny-Q8_0.json", "synth-gemma3-tiny-Q8_0.json"] {
        let o = kiln(&["parity", "--tensor-parallel", "2", "--only", only, "--json", fixtures.to_str().unwrap()]);
        let err = stderr(&o);
        assert!(o.status.success(), "{only}: {err}");
        assert!(err.contains("over 2 tensor-parallel ranks") && err.contains(": pass"), "{only}: {err}");
        let report = json(&o);
        assert_eq!(report.as_array().map(|a| a.len()), Some(1), "{only}");
        assert!(report[0]["failures"].as_array().is_some_and(|f| f.is_empty()), "{only}: {report}");
    }
    let o = kiln(&["parity", "--tensor-parallel", "3", "--only", "synth-tiny-Q8_0.json", fixtures.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(err.contains("skipped") && err.contains("4 query heads do not split evenly"), "{err}");
}
