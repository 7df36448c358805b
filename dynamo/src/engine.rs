//! [`LLMEngine`] on kiln's scheduler: `start` loads the model (CPU or GPU) and starts the
//! continuous-batching scheduler on a thread of its own, as `kiln serve` does; `generate` queues a
//! request whose events come back over a channel and streams its tokens; a cancelled request (or a
//! client gone) closes the channel, and the scheduler drops the sequence at its next step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use dynamo_backend_common::engine::{
    chunk, usage, GenerateContext, KvEventSource, LLMEngineOutputExt, MetricsBindings, MetricsCtx, PromptTokensDetails,
};
use dynamo_backend_common::{
    BackendError, DynamoError, EngineConfig, ErrorType, LLMEngine, LLMEngineOutput, LlmRegistration,
    PreprocessedRequest,
};
use futures::stream::BoxStream;
use kiln_engine::backend::{Backend, GpuModel, KV_BLOCK_POSITIONS};
use kiln_engine::constraint::ConstraintCompiler;
use kiln_engine::scheduler::{Event, EventSink, FinishReason, Request, Scheduler, SchedulerConfig, SchedulerStats};
use kiln_engine::speculative::SpecOptions;
use kiln_engine::{Model, WeightPages};
use kiln_model::Precision;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::kv::Publisher;
use crate::request;

/// How the worker runs the model.
#[derive(Clone, Debug)]
pub struct Options {
    pub model: PathBuf,
    pub served_name: String,
    pub parallel: usize,
    pub ctx: Option<usize>,
    pub max_queue: usize,
    pub backend: Backend,
    pub kv_memory: Option<usize>,
    pub spec: SpecOptions,
}

pub struct KilnEngine {
    opts: Options,
    running: Mutex<Option<Arc<Running>>>,
    kv: Publisher,
}

struct Running {
    model: Arc<Model>,
    queue: Mutex<Option<std::sync::mpsc::Sender<Request>>>,
    stats: Arc<SchedulerStats>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    n_ctx: usize,
    compiler: OnceLock<Result<ConstraintCompiler, String>>,
    /// Requests started, and those of them that found at least one KV block of their prompt in
    /// a cache (`kiln_requests_started_total`, `kiln_requests_prefix_hit_total`).
    started: AtomicU64,
    prefix_hits: AtomicU64,
}

impl Running {
    fn record_start(&self, cached_tokens: usize) {
        self.started.fetch_add(1, Ordering::Relaxed);
        if cached_tokens >= KV_BLOCK_POSITIONS {
            self.prefix_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// kiln's own counters in Prometheus' text format, beside Dynamo's on the worker's
    /// `/metrics` (`DYN_SYSTEM_PORT`).
    fn metrics_text(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        for (name, help, kind, v) in [
            (
                "kiln_requests_started_total",
                "Requests that got a slot.",
                "counter",
                self.started.load(Ordering::Relaxed),
            ),
            (
                "kiln_requests_prefix_hit_total",
                "Requests that found at least one KV block of their prompt cached.",
                "counter",
                self.prefix_hits.load(Ordering::Relaxed),
            ),
            (
                "kiln_prompt_tokens_total",
                "Prompt tokens evaluated.",
                "counter",
                s.prompt_tokens_evaluated.load(Ordering::Relaxed),
            ),
            (
                "kiln_prompt_tokens_cached_total",
                "Prompt tokens taken from a cache.",
                "counter",
                s.prompt_tokens_cached.load(Ordering::Relaxed),
            ),
            ("kiln_generated_tokens_total", "Tokens generated.", "counter", s.generated_tokens.load(Ordering::Relaxed)),
            ("kiln_running_requests", "Requests generating.", "gauge", s.active.load(Ordering::Relaxed) as u64),
            ("kiln_queue_depth", "Requests waiting for a slot.", "gauge", s.queued.load(Ordering::Relaxed) as u64),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

impl KilnEngine {
    pub fn new(opts: Options) -> KilnEngine {
        KilnEngine { opts, running: Mutex::new(None), kv: Publisher::default() }
    }

    fn running(&self) -> Result<Arc<Running>, DynamoError> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| error(BackendError::EngineShutdown, "the engine is not running".into()))
    }
}

fn error(kind: BackendError, message: String) -> DynamoError {
    DynamoError::builder().error_type(ErrorType::Backend(kind)).message(message).build()
}

/// A request's events, into the async stream that serves it.
struct Sink(UnboundedSender<Event>);

impl EventSink for Sink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Loads the model where `o.backend` says and starts the scheduler; returns the running engine
/// and the KV blocks its caches hold at most.
fn start_scheduler(o: &Options, kv: Publisher) -> anyhow::Result<(Running, u64)> {
    let choice = kiln_engine::backend::choose(o.backend)?;
    let pages = if choice.is_gpu() { WeightPages::Mapped } else { WeightPages::HugePages };
    let mut model = Model::load_with(&o.model, pages)?;
    let n_ctx = o.ctx.unwrap_or(model.weights.cfg.n_ctx_train.min(4096)).max(2);
    let mut gpu: Option<GpuModel> = None;
    if choice.is_gpu() {
        let (parallel, ctx) = (o.parallel, n_ctx);
        gpu = choice.upload(&model, |cfg| GpuModel::serving_bytes(cfg, parallel, ctx))?;
        if let Some(g) = gpu.as_mut() {
            let rows = if g.serve_rows_for_slots(parallel) { "tensor cores" } else { "CUDA cores" };
            tracing::info!("{parallel} sequences per step: generation rows on the {rows}");
        }
        if gpu.is_none() {
            // `auto` met a model the GPU cannot run (a notice said so): the CPU's layout after all.
            drop(model);
            model = Model::load_with(&o.model, WeightPages::HugePages)?;
        }
    }
    let model = Arc::new(model);
    let stats = Arc::new(SchedulerStats::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u64, String>>();
    let cfg = SchedulerConfig {
        n_slots: o.parallel,
        n_ctx,
        precision: Precision::Fast,
        prefill_budget: 512,
        panic_at_step: None,
    };
    let thread = {
        let (model, stats, cancel, kv_memory) = (model.clone(), stats.clone(), cancel.clone(), o.kv_memory);
        std::thread::Builder::new().name("kiln-scheduler".into()).spawn(move || {
            let sched = match &gpu {
                None => Scheduler::new(&model, cfg.clone(), stats.clone()),
                Some(g) => match g.paged(cfg.n_slots, cfg.n_ctx, kv_memory) {
                    Ok((backend, _)) => Scheduler::paged(&model, cfg.clone(), stats.clone(), backend),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("the GPU's KV cache: {e:#}")));
                        return;
                    }
                },
            };
            let blocks = match sched.blocks() {
                Some(b) => b.total as u64,
                None => (cfg.n_slots * cfg.n_ctx / KV_BLOCK_POSITIONS) as u64,
            };
            let mut sched = sched.with_kv_events(Box::new(kv));
            let _ = ready_tx.send(Ok(blocks));
            sched.run(&rx, &cancel)
        })?
    };
    let blocks = match ready_rx.recv() {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => anyhow::bail!(e),
        Err(_) => anyhow::bail!("the scheduler thread ended while starting"),
    };
    let running = Running {
        model,
        queue: Mutex::new(Some(tx)),
        stats,
        cancel,
        thread: Mutex::new(Some(thread)),
        n_ctx,
        compiler: OnceLock::new(),
        started: AtomicU64::new(0),
        prefix_hits: AtomicU64::new(0),
    };
    Ok((running, blocks))
}

#[async_trait]
impl LLMEngine for KilnEngine {
    async fn start(&self, worker_id: u64) -> Result<EngineConfig, DynamoError> {
        tracing::info!(worker_id, model = %self.opts.model.display(), "kiln: loading the model");
        let (o, kv) = (self.opts.clone(), self.kv.clone());
        let (running, blocks) = tokio::task::spawn_blocking(move || start_scheduler(&o, kv))
            .await
            .map_err(|e| error(BackendError::Unknown, format!("starting kiln: {e}")))?
            .map_err(|e| error(BackendError::InvalidArgument, format!("{e:#}")))?;
        let n_ctx = running.n_ctx;
        tracing::info!(n_ctx, blocks, parallel = self.opts.parallel, "kiln: the scheduler is running");
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(running));
        Ok(EngineConfig {
            model: self.opts.served_name.clone(),
            served_model_name: Some(self.opts.served_name.clone()),
            llm: Some(LlmRegistration {
                context_length: Some(n_ctx as u32),
                kv_cache_block_size: Some(KV_BLOCK_POSITIONS as u32),
                total_kv_blocks: Some(blocks),
                max_num_seqs: Some(self.opts.parallel as u64),
                max_num_batched_tokens: Some(n_ctx as u64),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn generate(
        &self,
        req: PreprocessedRequest,
        ctx: GenerateContext,
    ) -> Result<BoxStream<'static, Result<LLMEngineOutput, DynamoError>>, DynamoError> {
        let r = self.running()?;
        let job = request::job(&req, r.n_ctx, r.model.weights.cfg.n_vocab)
            .map_err(|e| error(BackendError::InvalidArgument, e))?;
        let constraint = match &job.constraint {
            None => None,
            Some(spec) => {
                let (r2, spec) = (r.clone(), spec.clone());
                // Compiling a schema takes milliseconds to seconds: off the async threads.
                let compiled = tokio::task::spawn_blocking(move || {
                    let c = r2
                        .compiler
                        .get_or_init(|| ConstraintCompiler::new(&r2.model.tokenizer).map_err(|e| format!("{e:#}")));
                    match c {
                        Ok(c) => c.compile(&spec),
                        Err(e) => Err(e.clone()),
                    }
                })
                .await
                .map_err(|e| error(BackendError::Unknown, format!("compiling the constraint: {e}")))?;
                Some(compiled.map_err(|e| error(BackendError::InvalidArgument, format!("guided decoding: {e}")))?)
            }
        };
        let Some(place) = r.stats.try_enter(self.opts.max_queue) else {
            let why = match r.stats.failure() {
                Some(f) => format!("the scheduler failed: {f}"),
                None => format!("the worker is full ({} requests running or waiting)", self.opts.max_queue),
            };
            return Err(error(BackendError::EngineShutdown, why));
        };
        let (etx, mut erx) = unbounded_channel();
        let prompt_len = job.prompt.len() as u32;
        let request = Request {
            prompt: job.prompt,
            params: job.params,
            max_tokens: job.max_tokens,
            stop: Vec::new(),
            stop_at_eog: job.stop_at_eog,
            logprobs: None,
            constraint,
            spec: self.opts.spec,
            token_deltas: true,
            sink: Box::new(Sink(etx)),
            submitted: Instant::now(),
            place,
        };
        let sent = match r.queue.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(q) => q.send(request).is_ok(),
            None => false,
        };
        if !sent {
            return Err(error(BackendError::EngineShutdown, "the engine is shutting down".into()));
        }
        let stream = async_stream::stream! {
            let mut generated = 0u32;
            loop {
                tokio::select! {
                    biased;
                    _ = ctx.stopped() => {
                        // Dropping the receiver tells the scheduler; the sequence leaves at its
                        // next step.
                        drop(erx);
                        yield Ok(LLMEngineOutput::cancelled().with_usage(usage(prompt_len, generated)));
                        break;
                    }
                    ev = erx.recv() => match ev {
                        Some(Event::Started { cached_tokens, .. }) => {
                            r.record_start(cached_tokens);
                        }
                        Some(Event::Delta { tokens, .. }) => {
                            if !tokens.is_empty() {
                                generated += tokens.len() as u32;
                                let mut out = chunk::token(tokens[0]);
                                out.token_ids = tokens;
                                yield Ok(out);
                            }
                        }
                        Some(Event::Done(fin)) => {
                            let end = match fin.reason {
                                FinishReason::Stop => LLMEngineOutput::stop(),
                                FinishReason::Length => LLMEngineOutput::length(),
                                FinishReason::Cancelled => LLMEngineOutput::cancelled(),
                            };
                            let mut u = usage(fin.prompt_tokens as u32, fin.completion_tokens as u32);
                            u.prompt_tokens_details = Some(PromptTokensDetails {
                                cached_tokens: Some(fin.cached_tokens as u32),
                                ..Default::default()
                            });
                            yield Ok(end.with_usage(u));
                            break;
                        }
                        Some(Event::Error(e)) => {
                            yield Err(error(BackendError::InvalidArgument, e));
                            break;
                        }
                        None => {
                            yield Err(error(BackendError::EngineShutdown, "the scheduler stopped".into()));
                            break;
                        }
                    }
                }
            }
        };
        Ok(Box::pin(stream))
    }

    async fn cleanup(&self) -> Result<(), DynamoError> {
        let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() else { return Ok(()) };
        r.cancel.store(true, Ordering::SeqCst);
        r.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = r.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }

    async fn setup_metrics(&self, ctx: MetricsCtx<'_>) -> Result<MetricsBindings, DynamoError> {
        let r = self.running()?;
        ctx.metrics.add_expfmt_callback(Arc::new(move || Ok(r.metrics_text())));
        Ok(MetricsBindings::default())
    }

    async fn kv_event_sources(&self) -> Result<Vec<KvEventSource>, DynamoError> {
        let kv = self.kv.clone();
        Ok(vec![KvEventSource::Push {
            on_ready: Box::new(move |p| {
                kv.connect(p);
                Ok(())
            }),
            dp_rank: 0,
        }])
    }
}
