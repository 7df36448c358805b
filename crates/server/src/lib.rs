//! `kiln serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the continuous
//! batching [`Scheduler`](kiln_engine::scheduler::Scheduler).
//!
//! The scheduler runs on its own thread and owns every forward pass; HTTP handlers tokenize,
//! validate, and hand it a request over a channel once it holds one of the `parallel + queue`
//! places (admission is counted, not bounded by the channel), then relay its events to the client
//! (as one JSON body, or as server-sent events). A dropped connection drops the handler's
//! receiver and its place, which the scheduler notices at its next step (waiting or running).

mod api;
mod conn;
mod error;
mod metrics;
mod openai;
mod structured;
mod tool_calls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Request as HttpRequest, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_engine::scheduler::{Request, Scheduler, SchedulerConfig, SchedulerStats};
use kiln_engine::GpuModel;
use kiln_engine::Model;
use kiln_model::Precision;
use sha2::{Digest, Sha256};

pub use conn::default_max_connections;
pub use error::ApiError;

#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Sequences decoded together (slots).
    pub parallel: usize,
    /// KV cache positions per slot.
    pub ctx: usize,
    /// Requests waiting for a slot beyond which new ones get 503.
    pub queue: usize,
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// On shutdown, how long running requests may go on before they are cancelled.
    pub grace: Duration,
    pub precision: Precision,
    /// Most prompt tokens evaluated in one batched step.
    pub prefill_budget: usize,
    /// Speculative decoding of requests that do not set their own (`speculative`).
    pub spec: kiln_engine::speculative::SpecOptions,
    /// A draft model for speculative decoding (`--model-draft`): requests may then speculate with
    /// it (`"speculative": {"mode": "draft"}`, or by default where `spec` says so).
    pub draft: Option<DraftModelFile>,
    /// The GPU the scheduler's steps run on (`kiln serve --backend`), with a paged KV cache of
    /// `kv_memory` bytes (`None`: what the GPU has free after the weights and work buffers).
    pub gpu: Option<Arc<GpuModel>>,
    pub kv_memory: Option<usize>,
    /// Fault injection for tests: the scheduler panics at this step (see
    /// [`SchedulerConfig::panic_at_step`]).
    #[doc(hidden)]
    pub fault_scheduler_panic_at_step: Option<u64>,
    /// Longest a client may take to send a request's headers: from the accept for a new
    /// connection, from the first byte for a later request on a kept-alive one. Slower ones are
    /// closed.
    pub header_timeout: Duration,
    /// Longest a client may take to send a request body, counted from the end of its headers;
    /// slower ones get 408 and the connection closes.
    pub body_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Longest a request may run, body read included; `None`: no limit. Past it a streamed
    /// answer ends with an error event and `[DONE]`, a non-streamed one gets 504.
    pub request_timeout: Option<Duration>,
    /// Most open connections; beyond it a new connection gets 503 with `Retry-After` and is
    /// closed. The default ([`default_max_connections`]) leaves room under the open-file limit.
    pub max_connections: usize,
}

/// Defaults of the connection clocks (`kiln serve --header-timeout` and so on).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on `max_connections`: beyond it the number is a mistake, not a plan.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl Config {
    /// Defaults for `model`: localhost:8080, 4 slots, context min(model, 4096).
    pub fn new(model: &Model) -> Config {
        Config {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx: model.default_ctx(),
            queue: 64,
            api_key: None,
            body_limit: 4 << 20,
            grace: Duration::from_secs(10),
            precision: Precision::Fast,
            prefill_budget: 256,
            spec: Default::default(),
            draft: None,
            gpu: None,
            kv_memory: None,
            fault_scheduler_panic_at_step: None,
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: None,
            max_connections: default_max_connections(),
        }
    }
}

/// A draft model loaded for the server, shared by its slots (each has its own KV cache for it).
#[derive(Clone)]
pub struct DraftModelFile(pub Arc<Model>);

impl std::fmt::Debug for DraftModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DraftModelFile").field(&self.0.path).finish()
    }
}

pub(crate) struct AppState {
    pub model: Arc<Model>,
    pub model_id: String,
    pub cfg: Config,
    pub queue: Sender<Request>,
    pub stats: Arc<SchedulerStats>,
    pub metrics: metrics::Metrics,
    /// Set once shutdown begins: new generation requests get 503.
    pub shutting_down: AtomicBool,
    /// SHA-256 of the API key, compared against the hash of the presented one.
    pub key_hash: Option<[u8; 32]>,
    pub created: u64,
}

/// A bound server whose scheduler thread is running.
pub struct Server {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    cancel: Arc<AtomicBool>,
    scheduler: std::thread::JoinHandle<()>,
}

impl Server {
    /// Binds `cfg.host:cfg.port` (port 0: any free port) and starts the scheduler. Must be called
    /// inside a tokio runtime.
    pub async fn bind(model: Arc<Model>, cfg: Config) -> Result<Server> {
        anyhow::ensure!(cfg.parallel >= 1, "--parallel must be at least 1");
        anyhow::ensure!(cfg.ctx >= 2, "--ctx must be at least 2");
        anyhow::ensure!(cfg.queue >= 1, "the queue must hold at least 1 request");
        // Every slot's KV cache, checked for overflow and against the memory available (on the
        // GPU the paged cache is sized from its memory instead).
        if cfg.gpu.is_none() {
            kiln_model::check_kv_memory(&model.weights.cfg, cfg.ctx, cfg.parallel)
                .with_context(|| format!("--ctx {} --parallel {}", cfg.ctx, cfg.parallel))?;
        }
        if let Some(d) = &cfg.draft {
            kiln_engine::speculative::check_vocabulary(&model, &d.0)?;
            // The draft model's caches too, and both together.
            let draft_bytes =
                kiln_model::check_kv_memory(&d.0.weights.cfg, cfg.ctx, cfg.parallel).with_context(|| {
                    format!("the draft model's KV caches, --ctx {} --parallel {}", cfg.ctx, cfg.parallel)
                })?;
            let main_bytes = kiln_model::kv_cache_bytes(&model.weights.cfg, cfg.ctx)
                .and_then(|b| b.checked_mul(cfg.parallel as u64))
                .unwrap_or(u64::MAX);
            if let Some(avail) = kiln_model::available_memory() {
                anyhow::ensure!(
                    main_bytes.saturating_add(draft_bytes) <= avail,
                    "--ctx {} --parallel {}: the KV caches of the model and the draft model need {} together; {} are available",
                    cfg.ctx,
                    cfg.parallel,
                    kiln_model::human_bytes(main_bytes.saturating_add(draft_bytes)),
                    kiln_model::human_bytes(avail)
                );
            }
        }
        if cfg.api_key.as_deref() == Some("") {
            anyhow::bail!("--api-key is empty");
        }
        for (flag, d) in [
            ("--header-timeout", Some(cfg.header_timeout)),
            ("--body-timeout", Some(cfg.body_timeout)),
            ("--idle-timeout", Some(cfg.idle_timeout)),
            ("--request-timeout", cfg.request_timeout),
        ] {
            anyhow::ensure!(d.is_none_or(|d| !d.is_zero()), "{flag} must be more than 0 seconds");
        }
        anyhow::ensure!(
            (1..=MAX_CONNECTIONS_LIMIT).contains(&cfg.max_connections),
            "--max-connections must be between 1 and {MAX_CONNECTIONS_LIMIT}, got {}",
            cfg.max_connections
        );
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("listening on {addr}"))?;
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let stats = Arc::new(SchedulerStats::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let sched_cfg = SchedulerConfig {
            n_slots: cfg.parallel,
            n_ctx: cfg.ctx,
            precision: cfg.precision,
            prefill_budget: cfg.prefill_budget.max(1),
            panic_at_step: cfg.fault_scheduler_panic_at_step,
        };
        // The scheduler says when its KV cache is in place (or why it could not be).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let scheduler = {
            let (model, stats, cancel) = (model.clone(), stats.clone(), cancel.clone());
            let draft = cfg.draft.clone();
            let (gpu, kv_memory) = (cfg.gpu.clone(), cfg.kv_memory);
            std::thread::Builder::new()
                .name("kiln-scheduler".into())
                .spawn(move || {
                    let sched = match &gpu {
                        None => Scheduler::new(&model, sched_cfg, stats.clone()),
                        Some(g) => match g.paged(sched_cfg.n_slots, sched_cfg.n_ctx, kv_memory) {
                            Ok((backend, bytes)) => {
                                let b = backend.blocks();
                                eprintln!(
                                    "kiln: paged KV cache on {}: {} blocks of {} positions ({})",
                                    g.device_name(),
                                    b.total,
                                    kiln_engine::backend::KV_BLOCK_POSITIONS,
                                    kiln_model::human_bytes(bytes as u64)
                                );
                                Scheduler::paged(&model, sched_cfg, stats.clone(), backend)
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("the GPU's KV cache: {e:#}")));
                                return;
                            }
                        },
                    };
                    let mut sched = match &draft {
                        None => sched,
                        Some(d) => match sched.with_draft(&d.0) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("the draft model's slots: {e:#}")));
                                return;
                            }
                        },
                    };
                    let _ = ready_tx.send(Ok(()));
                    sched.run(&rx, &cancel)
                })
                .context("starting the scheduler thread")?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!(e),
            Err(_) => anyhow::bail!("the scheduler thread ended while starting"),
        }
        // The constraint engine's view of the vocabulary (tens to hundreds of milliseconds) is
        // built now, off the request path; the first structured request waits for it if early.
        {
            let model = model.clone();
            let _ = std::thread::Builder::new().name("kiln-constraint-vocab".into()).spawn(move || {
                let _ = model.constraints();
            });
        }
        let model_id = model_id(&model);
        let key_hash = cfg.api_key.as_ref().map(|k| Sha256::digest(k.as_bytes()).into());
        let state = Arc::new(AppState {
            model,
            model_id,
            cfg,
            queue: tx,
            stats,
            metrics: Default::default(),
            shutting_down: AtomicBool::new(false),
            key_hash,
            created: openai::unix_now(),
        });
        Ok(Server { state, listener, cancel, scheduler })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The name clients pass as `model`: the file name without `.gguf`.
    pub fn model_id(&self) -> &str {
        &self.state.model_id
    }

    /// Serves until `shutdown` resolves; then stops accepting connections, lets running and
    /// queued requests finish for the grace period, cancels what is left, and returns once the
    /// scheduler has stopped. Returns an error if the scheduler thread ends on its own (it
    /// panicked): without it nothing can be served, and a process that stays up would answer 503
    /// forever.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server { state, listener, cancel, scheduler } = self;
        let app = router(state.clone());
        let mut conns = conn::Connections::new(&state.cfg);
        let mut shutdown = std::pin::pin!(shutdown);
        // How soon a dead scheduler is noticed; requests meanwhile get 503 or an error event.
        let mut check = tokio::time::interval(Duration::from_millis(200));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let scheduler_died = loop {
            tokio::select! {
                _ = &mut shutdown => break false,
                _ = check.tick() => if scheduler.is_finished() { break true },
                accepted = listener.accept() => conns.accept(accepted, &app).await,
            }
        };
        drop(listener);
        state.shutting_down.store(true, Ordering::SeqCst);
        if scheduler_died {
            let why = match scheduler.join() {
                Err(p) => format!("it panicked: {}", panic_message(p.as_ref())),
                Ok(()) => state.stats.failure().map_or("it returned".into(), |r| format!("it panicked: {r}")),
            };
            anyhow::bail!("the scheduler thread stopped while serving ({why}); exiting");
        }
        let grace = state.cfg.grace;
        eprintln!(
            "kiln: shutting down: {} running, {} queued; cancelling what is left after {:.1} s",
            state.stats.active.load(Ordering::SeqCst),
            state.stats.queued.load(Ordering::SeqCst),
            grace.as_secs_f64()
        );
        {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cancel.store(true, Ordering::SeqCst);
            });
        }
        // Idle connections close now, busy ones after their current response.
        conns.drain();
        // Connections that outlive the grace period (a client that never reads) do not hold the
        // process: a few seconds after the cancel, give up on them.
        tokio::select! {
            _ = conns.closed() => {}
            _ = tokio::time::sleep(grace.saturating_add(Duration::from_secs(5))) => {
                eprintln!("kiln: connections still open after the grace period; closing them");
            }
        }
        cancel.store(true, Ordering::SeqCst);
        drop(state);
        match tokio::task::spawn_blocking(move || scheduler.join()).await {
            Ok(Err(p)) => anyhow::bail!("the scheduler thread panicked: {}", panic_message(p.as_ref())),
            _ => Ok(()),
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Ctrl-C (SIGINT) and SIGTERM, listened to from creation on, so that none is missed between
/// two waits.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn new() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
            let term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
            Ok(Signals { int, term })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal; returns the exit status a process killed by it would have
    /// (128 + its number).
    pub async fn recv(&mut self) -> i32 {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => 128 + 2,
                _ = self.term.recv() => 128 + 15,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            128 + 2
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (never, if they cannot be listened to).
pub async fn shutdown_signal() {
    match Signals::new() {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// Runs the server on a new tokio runtime until Ctrl-C or SIGTERM (the `kiln serve` command). A
/// second signal during the grace period exits at once.
pub fn run_blocking(model: Model, cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut signals = Signals::new()?;
        let non_local = !is_loopback(&cfg.host);
        let has_key = cfg.api_key.is_some();
        let (parallel, ctx, queue, max_conns) = (cfg.parallel, cfg.ctx, cfg.queue, cfg.max_connections);
        let server = Server::bind(Arc::new(model), cfg).await?;
        let addr = server.local_addr()?;
        eprintln!(
            "kiln: serving {} on http://{addr}/v1 ({parallel} slots × {ctx} tokens, queue {queue}, up to {max_conns} connections{})",
            server.model_id(),
            if has_key { ", API key required" } else { "" }
        );
        if non_local && !has_key {
            eprintln!(
                "kiln: warning: listening on a non-local address without --api-key: anyone who can reach it can use it"
            );
        }
        if let Some(nofile) = conn::open_file_limit() {
            if max_conns as u64 > nofile {
                eprintln!(
                    "kiln: warning: --max-connections {max_conns} is above the open-file limit ({nofile}); connections \
                     past the limit fail at accept instead of getting 503 (raise it with `ulimit -n`)"
                );
            }
        }
        let shutdown = async move {
            signals.recv().await;
            tokio::spawn(async move {
                let status = signals.recv().await;
                eprintln!("kiln: second signal: exiting without waiting for running requests");
                std::process::exit(status);
            });
        };
        server.serve(shutdown).await?;
        eprintln!("kiln: stopped");
        Ok(())
    })
}

/// A server on its own thread and runtime, stopped (gracefully) on [`Running::stop`] or drop.
/// For tests and embedding.
pub struct Running {
    pub addr: SocketAddr,
    pub model_id: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Starts a server for `model` on a background thread; returns once it listens.
pub fn spawn(model: Arc<Model>, cfg: Config) -> Result<Running> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("kiln-server".into()).spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let server = match Server::bind(model, cfg).await {
                Ok(s) => s,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = ready_tx.send(Err(anyhow::anyhow!(msg)));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok((server.local_addr()?, server.model_id().to_string())));
            server
                .serve(async move {
                    let _ = stop_rx.await;
                })
                .await
        })
    })?;
    let (addr, model_id) = ready_rx.recv().context("the server thread ended before listening")??;
    Ok(Running { addr, model_id, stop: Some(stop_tx), thread: Some(thread) })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn model_id(model: &Model) -> String {
    let name = model.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(api::chat))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::models))
        .route("/v1/models/{id}", get(api::model))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(state.clone(), conn::limits))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Every endpoint but `/health` needs `Authorization: Bearer KEY` when a key is set (the scheme
/// in any case, RFC 7235). The keys
/// are compared as SHA-256 digests with a comparison that does not stop at the first difference,
/// so the time taken says nothing about how much of the key was right.
async fn auth(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let Some(want) = &state.key_hash else { return next.run(req).await };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .map(|k| Sha256::digest(k.as_bytes()));
    let ok = presented.is_some_and(|got| got.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
    if !ok {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

/// The credentials of an `Authorization: Bearer KEY` header value.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Counts responses by endpoint and status for `/metrics`.
async fn count(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        _ => "other",
    };
    let resp = next.run(req).await;
    state.metrics.record_response(endpoint, resp.status().as_u16());
    resp
}
