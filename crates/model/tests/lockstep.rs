//! The lock-step generation pass (every pool thread through every operation) gives the sectioned
//! pass's logits and cache contents bit for bit, for every tensor type, the woven layouts, batches
//! of sequences with one or several new tokens (or none), and any number of threads.

use std::path::{Path, PathBuf};

use kiln_gguf::GgufFile;
use kiln_model::{
    forward_batch_with, interleave_matrices, GenerationPass, KvCache, Logits, ModelWeights, SeqStep, Workspace,
};

/// `synth-tiny-NAME.gguf` (Llama), or `synth-NAME.gguf` for names like `qwen2-tiny-Q8_0`.
fn synth(name: &str) -> PathBuf {
    let file = if name.contains("-tiny-") { format!("synth-{name}.gguf") } else { format!("synth-tiny-{name}.gguf") };
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/models/synth")).join(file)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Three sequences: prompts of 40, 3 and 1 tokens (40: past Gemma 3's 32-position window) (always through the sectioned pass), then
/// generation steps through `pass`: all three one token each; sequence 0 three tokens (all
/// logits), sequence 1 idle, sequence 2 one; then one token each again. Returns every logit's bits
/// and the caches' filled keys and values.
fn run(w: &ModelWeights, pass: GenerationPass) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let vocab = w.cfg.n_vocab as u32;
    let tok = |seed: u32, i: u32| (seed * 7919 + i * 104_729) % vocab;
    let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&w.cfg, 64)).collect();
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let mut step = |caches: &mut [KvCache], toks: [Vec<u32>; 3], want: Logits, pass: GenerationPass| {
        let mut steps: Vec<SeqStep> =
            caches.iter_mut().zip(&toks).map(|(cache, t)| SeqStep { cache, tokens: t, want }).collect();
        let out = forward_batch_with(w, &mut steps, &mut ws, pass).expect("forward");
        logits.extend(out.iter().map(|l| bits(l)));
    };
    let prompts = [(0..40).map(|i| tok(1, i)).collect(), (0..3).map(|i| tok(2, i)).collect(), vec![tok(3, 0)]];
    step(&mut caches, prompts, Logits::All, GenerationPass::Sections);
    step(&mut caches, [vec![tok(4, 0)], vec![tok(5, 0)], vec![tok(6, 0)]], Logits::Last, pass);
    step(&mut caches, [(1..4).map(|i| tok(4, i)).collect(), vec![], vec![tok(6, 1)]], Logits::All, pass);
    step(&mut caches, [vec![tok(4, 9)], vec![tok(5, 9)], vec![tok(6, 9)]], Logits::Last, pass);
    let kv = caches
        .iter()
        .flat_map(|c| {
            let filled = c.len * c.kv_dim;
            c.keys.iter().chain(&c.values).map(move |v| bits(&v[..filled]))
        })
        .collect();
    (logits, kv)
}

/// One lock-step pass runs at a time in a process (asking for one while another runs panics):
/// the tests take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool")
}

#[test]
fn lockstep_matches_sections_bit_for_bit() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let names = [
        "F32",
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ4_NL",
        "IQ4_XS",
        "mixed",
        "Q8_0-tied",
        "qwen2-tiny-Q4_K",
        "qwen2-tiny-Q8_0",
        "qwen3-tiny-Q4_K",
        "qwen3-tiny-Q8_0",
        "gemma3-tiny-Q4_K",
        "gemma3-tiny-Q8_0",
    ];
    for name in names {
        let file = GgufFile::open(synth(name)).expect("open synth model");
        let w = ModelWeights::load(&file).expect("load weights");
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            let sections = pool.install(|| run(&w, GenerationPass::Sections));
            let lockstep = pool.install(|| run(&w, GenerationPass::Lockstep));
            assert!(sections.0 == lockstep.0, "{name}, {threads} threads: logits differ");
            assert!(sections.1 == lockstep.1, "{name}, {threads} threads: caches differ");
        }
    }
}

/// The woven layouts (Q4_0, Q4_K, Q5_K in a private copy) through both passes.
#[test]
fn lockstep_matches_sections_on_woven_weights() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["Q4_0", "Q4_K", "Q5_K", "mixed", "qwen3-tiny-Q4_K", "gemma3-tiny-Q4_K"] {
        let mut file = GgufFile::open(synth(name)).expect("open synth model");
        if !file.copy_data_to_huge_pages().expect("private copy") {
            // No private copy on this system: nothing is woven (the other test covers it).
            return;
        }
        let woven = interleave_matrices(&mut file).expect("weave");
        assert!(name == "mixed" || !woven.is_empty(), "{name}: nothing woven");
        let w = ModelWeights::load_interleaved(&file, &woven).expect("load weights");
        for threads in [2, 3] {
            let pool = pool(threads);
            let sections = pool.install(|| run(&w, GenerationPass::Sections));
            let lockstep = pool.install(|| run(&w, GenerationPass::Lockstep));
            assert!(sections.0 == lockstep.0, "{name} woven, {threads} threads: logits differ");
            assert!(sections.1 == lockstep.1, "{name} woven, {threads} threads: caches differ");
        }
    }
}
