//! The accuracy bars of kiln on every public parity fixture: the exact path against the float64
//! truth, the default path against llama.cpp's error on the same tokens, and greedy generation
//! through the KV cache reproducing the truth's continuation.

use std::path::{Path, PathBuf};

use kiln_engine::parity::{check_model, load_fixture, render_table, resolve_model};
use kiln_engine::{GenerateOptions, Model, Sampler, SamplingParams, Session};
use kiln_model::Precision;

fn fixture_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/parity");
    assert!(d.is_dir(), "{} is missing: the shared fixtures are required", d.display());
    d
}

/// Loads the model of `fixture` (fetching SmolLM2 or Gemma 3 270M like the CLI does); `None` =
/// skip, with a visible message, only when that model cannot be fetched.
fn load(fixture_name: &str) -> Option<(Model, kiln_engine::parity::Fixture, PathBuf)> {
    let dir = fixture_dir();
    let fx = load_fixture(&dir.join(format!("{fixture_name}.json"))).expect("fixture");
    match resolve_model(&dir, &fx.model, true) {
        Ok(Some(path)) => Some((Model::load(&path).expect("model loads"), fx, dir)),
        Ok(None) => panic!("model {} of fixture {fixture_name} not found", fx.model),
        Err(e) => {
            eprintln!("SKIPPED {fixture_name}: its model could not be fetched: {e:#}");
            None
        }
    }
}

fn parity(fixture_name: &str) {
    let Some((model, fx, dir)) = load(fixture_name) else { return };
    let report = check_model(&model, &fx, &dir).expect("parity run");
    eprintln!("{}", render_table(std::slice::from_ref(&report)));
    assert!(report.passed(), "{fixture_name}: {:?}", report.failures);
}

/// Greedy generation, one token per step through the KV cache, on the exact path.
fn greedy_continuations(fixture_name: &str) {
    let Some((model, fx, _)) = load(fixture_name) else { return };
    for case in &fx.cases {
        let n_ctx = case.prompt_tokens.len() + case.continuation.len();
        let mut s = Session::new(&model, n_ctx, Precision::Exact);
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let opts = GenerateOptions { max_tokens: case.continuation.len(), stop: vec![], stop_at_eog: false };
        let g = s.generate(&case.prompt_tokens, &opts, &mut sampler, |_| true).expect("generate");
        assert_eq!(g.tokens, case.continuation, "{fixture_name} case {}", case.name);
    }
}

/// Speculative decoding changes no greedy output: on the exact path the truth's continuation
/// comes out through verifications of up to 15 tokens (drafts from a script that is right except
/// at every fifth token, so rows are accepted and rejected at every offset); on the default path
/// the tokens of plain one-token steps come out, with scripted drafts and with prompt lookup
/// verifying every proposal whole.
fn speculative_greedy(fixture_name: &str) {
    use kiln_engine::speculative::{SpecOptions, Speculator};
    let Some((model, fx, _)) = load(fixture_name) else { return };
    let generate = |case: &kiln_engine::parity::Case, precision, spec: Option<&mut Speculator>| {
        let n_ctx = case.prompt_tokens.len() + case.continuation.len();
        let mut s = Session::new(&model, n_ctx, precision);
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let opts = GenerateOptions { max_tokens: case.continuation.len(), stop: vec![], stop_at_eog: false };
        let g = s.generate_with(&case.prompt_tokens, &opts, &mut sampler, None, spec, |_| true).expect("generate");
        g.tokens
    };
    for case in &fx.cases {
        // The expected sequence with every fifth generated token wrong.
        let mut script = case.prompt_tokens.clone();
        script.extend(case.continuation.iter().enumerate().map(|(i, &t)| if i % 5 == 3 { (t + 1) % 7 } else { t }));
        let name = format!("{fixture_name} case {}", case.name);
        let mut sp = Speculator::scripted(script.clone(), 14).unwrap();
        assert_eq!(generate(case, Precision::Exact, Some(&mut sp)), case.continuation, "{name}: exact, scripted");
        assert!(sp.stats.accepted > 0 && sp.stats.accepted < sp.stats.drafted, "{name}: {:?}", sp.stats);
        let plain = generate(case, Precision::Fast, None);
        for draft_max in [14, 3] {
            let mut sp = Speculator::scripted(script.clone(), draft_max).unwrap();
            assert_eq!(generate(case, Precision::Fast, Some(&mut sp)), plain, "{name}: default path, scripted");
            assert!(sp.stats.accepted > 0 && sp.stats.accepted < sp.stats.drafted, "{name}: {:?}", sp.stats);
        }
        let mut sp = Speculator::new(SpecOptions::default(), None).unwrap().unwrap().always_full_drafts();
        assert_eq!(generate(case, Precision::Fast, Some(&mut sp)), plain, "{name}: default path, prompt lookup");
    }
}

macro_rules! parity_tests {
    ($($test:ident => $fixture:literal),* $(,)?) => {
        mod parity_bars {
            $( #[test] fn $test() { super::parity($fixture) } )*
        }
        mod greedy {
            $( #[test] fn $test() { super::greedy_continuations($fixture) } )*
        }
        mod speculative {
            $( #[test] fn $test() { super::speculative_greedy($fixture) } )*
        }
    };
}

parity_tests! {
    f32 => "synth-tiny-F32",
    f16 => "synth-tiny-F16",
    bf16 => "synth-tiny-BF16",
    q4_0 => "synth-tiny-Q4_0",
    q4_1 => "synth-tiny-Q4_1",
    q5_0 => "synth-tiny-Q5_0",
    q5_1 => "synth-tiny-Q5_1",
    q8_0 => "synth-tiny-Q8_0",
    q8_0_tied => "synth-tiny-Q8_0-tied",
    q2_k => "synth-tiny-Q2_K",
    q3_k => "synth-tiny-Q3_K",
    q4_k => "synth-tiny-Q4_K",
    q5_k => "synth-tiny-Q5_K",
    q6_k => "synth-tiny-Q6_K",
    iq4_nl => "synth-tiny-IQ4_NL",
    iq4_xs => "synth-tiny-IQ4_XS",
    mixed => "synth-tiny-mixed",
    smollm2 => "smollm2-135m-instruct-Q4_1",
    qwen2_q4_k => "synth-qwen2-tiny-Q4_K",
    qwen2_q8_0 => "synth-qwen2-tiny-Q8_0",
    qwen3_q4_k => "synth-qwen3-tiny-Q4_K",
    qwen3_q8_0 => "synth-qwen3-tiny-Q8_0",
    gemma3_q4_k => "synth-gemma3-tiny-Q4_K",
    gemma3_q8_0 => "synth-gemma3-tiny-Q8_0",
}

/// The real Gemma 3 270M (Q4_K_M; 262k vocabulary, 18 layers, 5 local : 1 global with a
/// 512-position window; the "long" case crosses it): the bars only (its exact greedy
/// continuations are checked through `kiln run` in the CLI tests).
#[test]
fn gemma3_270m_parity_bars() {
    parity("gemma-3-270m-q4_k_m")
}
