//! `forward_batch` gives every sequence exactly (bit for bit) what `forward` gives it alone, and
//! each injected fault first changes the activation it is documented to change.

use std::path::{Path, PathBuf};

use kiln_gguf::GgufFile;
use kiln_model::{
    forward, forward_batch, forward_faulty, forward_ubatched, Activation, Fault, KvCache, Logits, ModelWeights,
    Observer, Precision, SeqStep, Workspace,
};

fn synth(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/models/synth"))
        .join(format!("synth-tiny-{name}.gguf"))
}

fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (seed * 7919 + i * 104_729) % vocab as u32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn batched_sequences_match_sequences_run_alone() {
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "mixed"] {
        let file = GgufFile::open(synth(name)).expect("open synth model");
        let w = ModelWeights::load(&file).expect("load weights");
        let vocab = w.cfg.n_vocab;
        // 20 tokens take the prompt (matrix-matrix) kernels, the others the generation ones.
        let prompts = [tokens(1, 20, vocab), tokens(2, 3, vocab), tokens(3, 1, vocab)];
        let next = [tokens(4, 2, vocab), tokens(5, 2, vocab), tokens(6, 2, vocab)];
        for precision in [Precision::Fast, Precision::Exact] {
            // Alone: prompt (all logits), then two single-token steps.
            let mut alone = Vec::new();
            for (p, nx) in prompts.iter().zip(&next) {
                let mut cache = KvCache::new(&w.cfg, 32);
                let mut out = vec![forward(&w, &mut cache, p, precision, Logits::All, None).expect("forward")];
                for &t in nx {
                    out.push(forward(&w, &mut cache, &[t], precision, Logits::Last, None).expect("forward"));
                }
                alone.push(out);
            }
            // Batched: the three prompts in one step, then decode steps, one with a sequence idle.
            let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&w.cfg, 32)).collect();
            let mut ws = Workspace::default();
            let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
            let mut steps: Vec<SeqStep> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(cache, p)| SeqStep { cache, tokens: p, want: Logits::All })
                .collect();
            let out = forward_batch(&w, &mut steps, precision, &mut ws, None).expect("batch");
            for (i, l) in out.into_iter().enumerate() {
                batched[i].push(l);
            }
            for k in 0..2 {
                let toks: Vec<[u32; 1]> = next.iter().map(|nx| [nx[k]]).collect();
                // In the first decode step sequence 1 sits out, then catches up alone.
                let mut steps: Vec<SeqStep> = caches
                    .iter_mut()
                    .zip(&toks)
                    .enumerate()
                    .map(|(i, (cache, t))| SeqStep {
                        cache,
                        tokens: if k == 0 && i == 1 { &[] } else { t },
                        want: Logits::Last,
                    })
                    .collect();
                let out = forward_batch(&w, &mut steps, precision, &mut ws, None).expect("batch");
                assert!(k != 0 || out[1].is_empty(), "an idle sequence gets no logits");
                for (i, l) in out.into_iter().enumerate() {
                    if !l.is_empty() {
                        batched[i].push(l);
                    }
                }
                if k == 0 {
                    let mut one = [SeqStep { cache: &mut caches[1], tokens: &toks[1], want: Logits::Last }];
                    batched[1].push(forward_batch(&w, &mut one, precision, &mut ws, None).expect("batch").remove(0));
                }
            }
            for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
                assert_eq!(a.len(), b.len());
                for (step, (x, y)) in a.iter().zip(b).enumerate() {
                    assert_eq!(bits(x), bits(y), "{name} {precision:?}: sequence {i} step {step} differs when batched");
                }
            }
        }
    }
}

#[test]
fn batch_errors_leave_every_cache_untouched() {
    let file = GgufFile::open(synth("Q8_0")).expect("open synth model");
    let w = ModelWeights::load(&file).expect("load weights");
    let mut a = KvCache::new(&w.cfg, 8);
    let mut b = KvCache::new(&w.cfg, 4);
    let (ta, tb) = (tokens(1, 3, w.cfg.n_vocab), tokens(2, 5, w.cfg.n_vocab));
    let mut steps = [
        SeqStep { cache: &mut a, tokens: &ta, want: Logits::Last },
        SeqStep { cache: &mut b, tokens: &tb, want: Logits::Last },
    ];
    let err = forward_batch(&w, &mut steps, Precision::Fast, &mut Workspace::default(), None).unwrap_err();
    assert!(err.to_string().contains('5'), "{err}");
    assert_eq!((a.len, b.len), (0, 0));
}

/// A prompt longer than the micro-batch runs in equal parts; every position's logits are bit for
/// bit those of one batch (each part big enough for the prompt kernels), and a prompt that does
/// not fit leaves the cache untouched.
#[test]
fn micro_batches_match_one_batch() {
    for name in ["F32", "Q4_0", "Q8_0", "Q4_K"] {
        let file = GgufFile::open(synth(name)).expect("open synth model");
        let w = ModelWeights::load(&file).expect("load weights");
        let p = tokens(7, 41, w.cfg.n_vocab);
        for precision in [Precision::Fast, Precision::Exact] {
            let mut one = KvCache::new(&w.cfg, 64);
            let whole = forward_ubatched(&w, &mut one, &p, precision, Logits::All, None, 64).expect("one batch");
            // at most 21 per part: two parts of 21 and 20 tokens, both on the prompt kernels
            let mut parts = KvCache::new(&w.cfg, 64);
            let split = forward_ubatched(&w, &mut parts, &p, precision, Logits::All, None, 21).expect("parts");
            assert_eq!(bits(&whole), bits(&split), "{name} {precision:?}");
            assert_eq!(parts.len, 41);
            // only the last position's logits (one row through the output matrix) likewise
            let mut one = KvCache::new(&w.cfg, 64);
            let whole = forward_ubatched(&w, &mut one, &p, precision, Logits::Last, None, 64).expect("one batch");
            let mut parts = KvCache::new(&w.cfg, 64);
            let split = forward_ubatched(&w, &mut parts, &p, precision, Logits::Last, None, 21).expect("parts");
            assert_eq!(bits(&whole), bits(&split), "{name} {precision:?} last");
        }
        let mut small = KvCache::new(&w.cfg, 40);
        let err = forward_ubatched(&w, &mut small, &p, Precision::Fast, Logits::Last, None, 21).unwrap_err();
        assert!(err.to_string().contains("41"), "{err}");
        assert_eq!(small.len, 0);
    }
}

/// Wants no activation: the forward pass then runs unsplit (observers see whole activations).
struct Silent;

impl Observer for Silent {
    fn wants(&self, _: Option<usize>, _: &'static str) -> bool {
        false
    }
    fn observe(&mut self, _: &Activation) {}
}

/// A long step computes the FFN in pieces: on the default path with integer-form down matrices
/// the whole FFN (gate and up rows, down columns), else the up projection's rows; every position's
/// logits are bit for bit those of the whole FFN (what a run with an observer computes).
#[test]
fn ffn_pieces_match_the_whole_ffn() {
    for name in ["F32", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "mixed"] {
        let file = GgufFile::open(synth(name)).expect("open synth model");
        let w = ModelWeights::load(&file).expect("load weights");
        let p = tokens(5, 300, w.cfg.n_vocab);
        for precision in [Precision::Fast, Precision::Exact] {
            let mut a = KvCache::new(&w.cfg, 300);
            let pieces = forward(&w, &mut a, &p, precision, Logits::All, None).expect("pieces");
            let mut b = KvCache::new(&w.cfg, 300);
            let whole = forward(&w, &mut b, &p, precision, Logits::All, Some(&mut Silent)).expect("one piece");
            assert_eq!(bits(&pieces), bits(&whole), "{name} {precision:?}");
        }
    }
}

/// Records every activation of a forward call in order.
#[derive(Default)]
struct Recorder(Vec<(String, Vec<f32>)>);

impl Observer for Recorder {
    fn observe(&mut self, a: &Activation) {
        self.0.push((a.name(), a.data.to_vec()));
    }
}

#[test]
fn each_fault_first_changes_its_documented_activation() {
    let file = GgufFile::open(synth("F32")).expect("open synth model");
    let w = ModelWeights::load(&file).expect("load weights");
    let toks = tokens(9, 6, w.cfg.n_vocab);
    let run = |fault: Option<Fault>| {
        let mut rec = Recorder::default();
        let mut cache = KvCache::new(&w.cfg, 16);
        forward_faulty(&w, &mut cache, &toks, Precision::Exact, Logits::All, Some(&mut rec), fault).expect("forward");
        rec.0
    };
    let clean = run(None);
    for (fault, first) in [
        (Fault::RopePairing, "q_rope-0"),
        (Fault::TransposedLmHead, "logits"),
        (Fault::NoRmsEps, "attn_norm-0"),
        (Fault::F16Matmul, "q-0"),
    ] {
        let faulty = run(Some(fault));
        assert_eq!(faulty.len(), clean.len());
        let differs = clean.iter().zip(&faulty).find(|(c, f)| bits(&c.1) != bits(&f.1)).map(|(c, _)| c.0.clone());
        assert_eq!(differs.as_deref(), Some(first), "{fault}");
    }
}
