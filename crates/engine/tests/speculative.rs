//! Speculative decoding with a draft model: the same greedy output as plain decoding, and a
//! clear refusal of a draft model with another vocabulary.

use std::path::{Path, PathBuf};

use kiln_engine::speculative::{check_vocabulary, DraftModel, SpecMode, SpecOptions, Speculator};
use kiln_engine::{GenerateOptions, Model, Sampler, SamplingParams, Session};
use kiln_model::Precision;

fn synth(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(format!("synth-{name}.gguf"))
}

fn greedy(model: &Model, prompt: &[u32], spec: Option<&mut Speculator>) -> Vec<u32> {
    let mut s = Session::new(model, 256, Precision::Fast);
    let opts = GenerateOptions { max_tokens: 60, stop: vec![], stop_at_eog: false };
    let mut sampler = Sampler::new(SamplingParams::greedy());
    s.generate_with(prompt, &opts, &mut sampler, None, spec, |_| true).unwrap().tokens
}

/// The output is the model's own, token for token, whatever the draft model: the same weights
/// as a draft (its single steps give the bits of the model's verification rows, so every draft
/// is accepted) and other weights of the same vocabulary (synthetic weights: random blocks per
/// type, so nearly every draft is rejected).
#[test]
fn a_draft_model_changes_no_greedy_output() {
    let target = Model::load(&synth("tiny-Q8_0")).unwrap();
    let prompt = target.tokenizer.encode("Once upon a time, in a land far away, there lived", true, false).unwrap();
    let plain = greedy(&target, &prompt, None);
    for (draft_name, all_accepted) in [("tiny-Q8_0", true), ("tiny-Q4_0", false)] {
        let draft = Model::load(&synth(draft_name)).unwrap();
        check_vocabulary(&target, &draft).unwrap();
        for draft_max in [14, 4] {
            let opts = SpecOptions { mode: SpecMode::Draft, draft_max };
            let dm = DraftModel::new(&draft, 256).unwrap();
            let mut sp = Speculator::new(opts, Some(dm)).unwrap().unwrap().always_full_drafts();
            assert_eq!(greedy(&target, &prompt, Some(&mut sp)), plain, "{draft_name}, draft-max {draft_max}");
            let st = sp.stats;
            assert!(st.drafted > 0, "{st:?}");
            assert_eq!(st.accepted == st.drafted, all_accepted, "{draft_name}, draft-max {draft_max}: {st:?}");
        }
    }
}

/// Drafts are token ids: a draft model with another vocabulary is refused by name.
#[test]
fn a_draft_model_with_another_vocabulary_is_refused() {
    let target = Model::load(&synth("tiny-Q8_0")).unwrap();
    let other = Model::load(&synth("qwen2-tiny-Q8_0")).unwrap();
    let e = check_vocabulary(&target, &other).unwrap_err().to_string();
    assert!(e.contains("must share the vocabulary") && e.contains("qwen2-tiny"), "{e}");
    // Speculating with a draft model needs one.
    let e = Speculator::new(SpecOptions { mode: SpecMode::Draft, draft_max: 4 }, None).err().unwrap().to_string();
    assert!(e.contains("--model-draft"), "{e}");
    let e = Speculator::new(SpecOptions { mode: SpecMode::Ngram, draft_max: 15 }, None).err().unwrap().to_string();
    assert!(e.contains("above 14"), "{e}");
}

/// Sampled output with speculation is plain decoding's, token for token, for every seed: each
/// position draws with the same random number from the same logits, and a draft counts only where
/// it is the token drawn. 200 seeds at temperature 1, drafts from a script of the plain output
/// (right except every fourth token, so accepted and rejected drafts both occur) and from prompt
/// lookup.
#[test]
fn sampled_output_is_plain_decodings_for_every_seed() {
    let model = Model::load(&synth("tiny-Q4_K")).unwrap();
    let prompt = model.tokenizer.encode("The rain in Spain falls mainly on the plain.", true, false).unwrap();
    let run = |seed: u64, spec: Option<&mut Speculator>| {
        let mut s = Session::new(&model, 128, Precision::Fast);
        let opts = GenerateOptions { max_tokens: 24, stop: vec![], stop_at_eog: false };
        let params = SamplingParams { temperature: 1.0, seed, ..Default::default() };
        s.generate_with(&prompt, &opts, &mut Sampler::new(params), None, spec, |_| true).unwrap().tokens
    };
    let (mut accepted, mut drafted) = (0, 0);
    for seed in 0..200 {
        let plain = run(seed, None);
        let mut script = prompt.clone();
        script.extend(plain.iter().enumerate().map(|(i, &t)| if i % 4 == 2 { (t + 1) % 50 } else { t }));
        let mut sp = Speculator::scripted(script, 6).unwrap();
        assert_eq!(run(seed, Some(&mut sp)), plain, "seed {seed}, scripted drafts");
        (accepted, drafted) = (accepted + sp.stats.accepted, drafted + sp.stats.drafted);
        let mut sp = Speculator::new(SpecOptions::default(), None).unwrap().unwrap().always_full_drafts();
        assert_eq!(run(seed, Some(&mut sp)), plain, "seed {seed}, prompt lookup");
    }
    assert!(accepted > 0 && accepted < drafted, "accepted {accepted} of {drafted}");
}
