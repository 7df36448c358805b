//! Batch invariance of the scheduler: a request's tokens and log-probabilities (the bits of its
//! top-20 alternatives at every position) are the same whether it runs alone or beside 1, 7 or 63
//! other requests, on the CPU and (with `--features cuda` and a GPU) on the GPU's paged KV cache.
//! The GPU part also checks prefix sharing, block exhaustion, a disconnect's blocks and speculation
//! there; without a GPU (CI) it prints a visible SKIPPED line and passes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_engine::scheduler::{Event, EventSink, Request, Scheduler, SchedulerConfig, SchedulerStats};
#[cfg(feature = "cuda")]
use kiln_engine::speculative::SpecMode;
use kiln_engine::speculative::SpecOptions;
#[cfg(feature = "cuda")]
use kiln_engine::WeightPages;
use kiln_engine::{Model, SamplingParams};
use kiln_model::Precision;

/// Written to stderr directly: the harness captures `eprintln!` of passing tests.
fn skipped(what: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// `../shared/models/synth` beside the checkout, or `KILN_SYNTH_DIR` (GPU machines carry a copy).
fn synth(name: &str) -> PathBuf {
    match std::env::var_os("KILN_SYNTH_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth").join(name),
    }
}

type Log = Arc<Mutex<Vec<Event>>>;

struct Collect(Log, Arc<AtomicBool>);

impl EventSink for Collect {
    fn send(&mut self, event: Event) -> bool {
        self.0.lock().unwrap().push(event);
        !self.1.load(Ordering::SeqCst)
    }
    fn is_closed(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }
}

/// One request of a batch: prompt, tokens to generate, sampling (None: greedy, else the seed of a
/// temperature-0.9 draw), speculation.
#[derive(Clone)]
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    seed: Option<u64>,
    spec: SpecOptions,
}

/// A generated token, the bits of its log-probability, and its top-20 alternatives (id, bits).
type TokenBits = (u32, u32, Vec<(u32, u32)>);

/// What a request produced: tokens with the bits of their log-probability and top-20
/// alternatives, the prompt tokens reused from cache, and any error.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<TokenBits>,
    cached: usize,
    error: Option<String>,
}

fn outcome(log: &Log) -> Outcome {
    let ev = log.lock().unwrap();
    let mut o = Outcome { tokens: Vec::new(), cached: 0, error: None };
    for e in ev.iter() {
        match e {
            Event::Delta { logprobs, .. } => {
                o.tokens.extend(logprobs.iter().map(|t| {
                    (t.token, t.logprob.to_bits(), t.top.iter().map(|(id, _, l)| (*id, l.to_bits())).collect())
                }))
            }
            Event::Done(f) => o.cached = f.cached_tokens,
            Event::Error(m) => o.error = Some(m.clone()),
            Event::Started { .. } => {}
        }
    }
    o
}

fn request(stats: &Arc<SchedulerStats>, job: &Job, log: Log, gone: Arc<AtomicBool>) -> Request {
    let params = match job.seed {
        None => SamplingParams::greedy(),
        Some(seed) => SamplingParams { temperature: 0.9, seed, ..SamplingParams::greedy() },
    };
    Request {
        prompt: job.prompt.clone(),
        params,
        max_tokens: job.max_tokens,
        stop: vec![],
        stop_at_eog: false,
        logprobs: Some(20),
        constraint: None,
        spec: job.spec,
        token_deltas: false,
        sink: Box::new(Collect(log, gone)),
        submitted: Instant::now(),
        place: stats.try_enter(usize::MAX).expect("a place"),
    }
}

/// Runs `jobs` through `sched` (all submitted at once; those without a slot or blocks wait, in
/// order) until all are done. `on_step` sees the scheduler after each step.
fn run_all(
    sched: &mut Scheduler<'_>,
    stats: &Arc<SchedulerStats>,
    jobs: &[Job],
    mut on_step: impl FnMut(&Scheduler<'_>, usize),
) -> Vec<Outcome> {
    let logs: Vec<Log> = jobs.iter().map(|_| Log::default()).collect();
    let mut waiting: std::collections::VecDeque<Request> =
        jobs.iter().zip(&logs).map(|(j, l)| request(stats, j, l.clone(), Arc::new(AtomicBool::new(false)))).collect();
    let mut step = 0;
    loop {
        while let Some(r) = waiting.pop_front() {
            if let Err(r) = sched.admit(r) {
                waiting.push_front(*r);
                break;
            }
        }
        if sched.n_active() == 0 && waiting.is_empty() {
            break;
        }
        assert!(sched.n_active() > 0, "requests wait with nothing running");
        sched.step();
        step += 1;
        on_step(sched, step);
    }
    logs.iter().map(outcome).collect()
}

fn cfg(n_slots: usize, n_ctx: usize) -> SchedulerConfig {
    SchedulerConfig { n_slots, n_ctx, precision: Precision::Fast, prefill_budget: 64, panic_at_step: None }
}

/// The target (job 0) and `others` other jobs: prompts of 5 to 70 tokens (some read in several
/// chunks), greedy and sampled, different lengths.
fn jobs(n_vocab: u32, target_len: usize, others: usize) -> Vec<Job> {
    let mut v = vec![Job {
        prompt: (0..target_len as u32).map(|i| (i * 31 + 7) % n_vocab).collect(),
        max_tokens: 24,
        seed: None,
        spec: SpecOptions::off(),
    }];
    for k in 0..others as u32 {
        let len = 5 + (k as usize * 13) % 66;
        v.push(Job {
            prompt: (0..len as u32).map(|i| (i * 17 + k * 101 + 3) % n_vocab).collect(),
            max_tokens: 8 + (k as usize * 7) % 30,
            seed: (k % 3 == 1).then_some(k as u64),
            spec: SpecOptions::off(),
        });
    }
    v
}

/// The target alone, then beside 1, 7 and 63 others: identical outcome every time.
fn check_invariance<'m>(
    model: &'m Model,
    mut make: impl FnMut(usize) -> (Scheduler<'m>, Arc<SchedulerStats>),
    what: &str,
) {
    let nv = model.weights.cfg.n_vocab as u32;
    for target_len in [9, 40] {
        let mut base = None;
        for others in [0, 1, 7, 63] {
            let (mut sched, stats) = make(others + 1);
            let all = run_all(&mut sched, &stats, &jobs(nv, target_len, others), |_, _| {});
            for (i, o) in all.iter().enumerate() {
                assert!(o.error.is_none(), "{what}: request {i} of {}: {:?}", others + 1, o.error);
            }
            let target = &all[0];
            assert_eq!(target.tokens.len(), 24, "{what}");
            match &base {
                None => base = Some(all.into_iter().next().unwrap()),
                Some(b) => assert!(
                    b.tokens == target.tokens,
                    "{what}: a {target_len}-token prompt's output differs with {others} other requests"
                ),
            }
        }
    }
}

#[test]
fn cpu_batch_invariance_1_2_8_64() {
    for name in ["synth-tiny-Q4_0.gguf", "synth-tiny-Q4_K.gguf"] {
        let model = Model::load(&synth(name)).expect("synth model");
        check_invariance(
            &model,
            |n| {
                let stats = Arc::new(SchedulerStats::default());
                (Scheduler::new(&model, cfg(n, 160), stats.clone()), stats)
            },
            name,
        );
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_serving() {
    skipped("gpu_serving: this build has no CUDA backend (cargo test --features cuda on a GPU machine)");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_serving() {
    use kiln_engine::backend::{choose, Backend};
    use kiln_engine::GpuModel;
    if let Err(e) = choose(Backend::Cuda) {
        skipped(&format!("gpu_serving: {e:#}"));
        return;
    }
    for name in ["synth-tiny-Q4_0.gguf", "synth-tiny-mixed.gguf", "synth-tiny-Q8_0.gguf"] {
        let path = synth(name);
        let model = Model::load_with(&path, WeightPages::Mapped).expect("synth model");
        let gpu: GpuModel = choose(Backend::Cuda).unwrap().upload(&model, |_| 0).unwrap().expect("a GPU model");
        let paged = |n: usize, n_ctx: usize, kv: Option<usize>| {
            let stats = Arc::new(SchedulerStats::default());
            let (backend, _) = gpu.paged(n, n_ctx, kv).expect("paged KV cache");
            (Scheduler::paged(&model, cfg(n, n_ctx), stats.clone(), backend), stats)
        };
        check_invariance(&model, |n| paged(n, 160, Some(64 << 20)), name);
        gpu_prefix_sharing(&model, &paged, name);
        gpu_block_exhaustion(&model, &paged, name);
        gpu_disconnect_frees_blocks(&model, &paged, name);
        gpu_speculation_is_exact(&model, &paged, name);
        eprintln!("gpu_serving: {name}: invariance, prefix sharing, exhaustion, disconnect, speculation: ok");
    }
}

#[cfg(feature = "cuda")]
type Paged<'a> = dyn Fn(usize, usize, Option<usize>) -> (Scheduler<'a>, Arc<SchedulerStats>) + 'a;

/// Two requests with a common 1,000-token prefix: the second shares its whole chunks (768
/// positions = 48 blocks), so fewer blocks are in use, and its output is that of a fresh cache.
#[cfg(feature = "cuda")]
fn gpu_prefix_sharing<'a>(model: &Model, paged: &Paged<'a>, what: &str) {
    let nv = model.weights.cfg.n_vocab as u32;
    let prefix: Vec<u32> = (0..1000u32).map(|i| (i * 29 + 11) % nv).collect();
    let job = |tail: u32| Job {
        prompt: prefix.iter().copied().chain((0..20).map(|i| (i * 7 + tail) % nv)).collect(),
        max_tokens: 16,
        seed: None,
        spec: SpecOptions::off(),
    };
    let (a, b) = (job(1), job(2));
    // Fresh: b alone on an empty cache.
    let (mut s, st) = paged(2, 1100, None);
    let fresh = run_all(&mut s, &st, std::slice::from_ref(&b), |_, _| {});
    drop(s);
    // a, then b while a still runs: b shares a's prompt blocks.
    let (mut s, st) = paged(2, 1100, None);
    let mut peak_alone = 0;
    let _ =
        run_all(&mut s, &st, std::slice::from_ref(&a), |s, _| peak_alone = peak_alone.max(s.blocks().unwrap().used));
    // a finished: its prompt's whole chunks stay cached.
    assert_eq!(s.blocks().unwrap().cached, 768 / 16, "{what}: a's whole prompt chunks stay cached");
    let mut peak_both = 0;
    let both =
        run_all(&mut s, &st, &[a.clone(), b.clone()], |s, _| peak_both = peak_both.max(s.blocks().unwrap().used));
    assert_eq!(both[1].cached, 768, "{what}: b shares a's whole chunks");
    assert!(peak_both < 2 * peak_alone, "{what}: sharing uses fewer blocks ({peak_both} vs 2 × {peak_alone})");
    assert_eq!(both[1].tokens, fresh[0].tokens, "{what}: shared blocks give the bits of a fresh computation");
}

/// A KV pool for 3 sequences and 12 requests: they wait for blocks, none fails, outputs as alone.
#[cfg(feature = "cuda")]
fn gpu_block_exhaustion<'a>(model: &Model, paged: &Paged<'a>, what: &str) {
    let nv = model.weights.cfg.n_vocab as u32;
    let js = jobs(nv, 40, 11);
    let per_block = 2 * model.weights.cfg.n_layer * 16 * model.weights.cfg.kv_dim() * 4;
    // Each job needs at most (70 + 37) / 16 → 7 blocks: 21 blocks hold 3 at a time.
    let (mut s, st) = paged(12, 128, Some(21 * per_block));
    let mut most = 0;
    let all = run_all(&mut s, &st, &js, |s, _| most = most.max(s.n_active()));
    assert!(most < 12, "{what}: the pool cannot have held all 12 at once ({most})");
    for (i, o) in all.iter().enumerate() {
        assert!(o.error.is_none(), "{what}: request {i} failed: {:?}", o.error);
    }
    let (mut s1, st1) = paged(1, 128, None);
    let alone = run_all(&mut s1, &st1, &js[..1], |_, _| {});
    assert_eq!(all[0].tokens, alone[0].tokens, "{what}: waiting for blocks changes no result");
}

/// A client that goes away mid-generation: its blocks are free at the next step.
#[cfg(feature = "cuda")]
fn gpu_disconnect_frees_blocks<'a>(model: &Model, paged: &Paged<'a>, what: &str) {
    let nv = model.weights.cfg.n_vocab as u32;
    let (mut s, st) = paged(2, 256, None);
    let job = &jobs(nv, 40, 0)[0];
    let gone = Arc::new(AtomicBool::new(false));
    let log = Log::default();
    assert!(s.admit(request(&st, job, log.clone(), gone.clone())).is_ok());
    for _ in 0..5 {
        s.step();
    }
    assert!(s.blocks().unwrap().used > 0);
    gone.store(true, Ordering::SeqCst);
    s.step();
    assert_eq!(s.n_active(), 0, "{what}");
    assert_eq!(s.blocks().unwrap().used, 0, "{what}: the client's blocks are free");
}

/// Prompt-lookup speculation on the GPU gives plain decoding's tokens (verification rows take the
/// one-token kernels).
#[cfg(feature = "cuda")]
fn gpu_speculation_is_exact<'a>(model: &Model, paged: &Paged<'a>, what: &str) {
    let nv = model.weights.cfg.n_vocab as u32;
    // A repeating prompt, so lookup drafts often.
    let prompt: Vec<u32> = (0..60u32).map(|i| (i % 12) * 37 % nv).collect();
    let mut job = Job { prompt, max_tokens: 40, seed: None, spec: SpecOptions::off() };
    let (mut s, st) = paged(1, 256, None);
    let plain = run_all(&mut s, &st, std::slice::from_ref(&job), |_, _| {});
    job.spec = SpecOptions { mode: SpecMode::Ngram, draft_max: 8 };
    let (mut s, st) = paged(1, 256, None);
    let spec = run_all(&mut s, &st, std::slice::from_ref(&job), |_, _| {});
    assert_eq!(plain[0].tokens, spec[0].tokens, "{what}: speculation changed the output");
    assert!(st.spec_drafted.load(Ordering::Relaxed) > 0, "{what}: nothing was drafted");
}
