//! `kiln serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the continuous
//! batching [`Scheduler`](kiln_engine::scheduler::Scheduler).
//!
//! The scheduler runs on its own thread and owns every forward pass; HTTP handlers tokenize,
//! validate, and hand it a request over a bounded channel, then relay its events to the client
//! (as one JSON body, or as server-sent events). A dropped connection drops the handler's
//! receiver, which the scheduler notices at its next step.

mod api;
mod error;
mod metrics;
mod openai;
mod structured;
mod tool_calls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Request as HttpRequest, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_engine::scheduler::{Request, Scheduler, SchedulerConfig, SchedulerStats};
use kiln_engine::Model;
use kiln_model::Precision;
use sha2::{Digest, Sha256};

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
}

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
        }
    }
}

pub(crate) struct AppState {
    pub model: Arc<Model>,
    pub model_id: String,
    pub cfg: Config,
    pub queue: SyncSender<Request>,
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
        if cfg.api_key.as_deref() == Some("") {
            anyhow::bail!("--api-key is empty");
        }
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("listening on {addr}"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Request>(cfg.queue);
        let stats = Arc::new(SchedulerStats::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let sched_cfg = SchedulerConfig {
            n_slots: cfg.parallel,
            n_ctx: cfg.ctx,
            precision: cfg.precision,
            prefill_budget: cfg.prefill_budget.max(1),
        };
        let scheduler = {
            let (model, stats, cancel) = (model.clone(), stats.clone(), cancel.clone());
            std::thread::Builder::new()
                .name("kiln-scheduler".into())
                .spawn(move || Scheduler::new(&model, sched_cfg, stats).run(&rx, &cancel))
                .context("starting the scheduler thread")?
        };
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
    /// scheduler has stopped.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server { state, listener, cancel, scheduler } = self;
        let app = router(state.clone());
        let (begun_tx, mut begun_rx) = tokio::sync::watch::channel(false);
        let on_signal = {
            let (state, cancel) = (state.clone(), cancel.clone());
            async move {
                shutdown.await;
                state.shutting_down.store(true, Ordering::SeqCst);
                let grace = state.cfg.grace;
                eprintln!(
                    "kiln: shutting down: {} running, {} queued; cancelling what is left after {:.1} s",
                    state.stats.active.load(Ordering::SeqCst),
                    state.stats.queued.load(Ordering::SeqCst),
                    grace.as_secs_f64()
                );
                let _ = begun_tx.send(true);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    cancel.store(true, Ordering::SeqCst);
                });
            }
        };
        let serving = axum::serve(listener, app).with_graceful_shutdown(on_signal);
        // Connections that outlive the grace period (a client that never reads) do not hold the
        // process: a few seconds after the cancel, give up on them.
        let deadline = async {
            while !*begun_rx.borrow() {
                if begun_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(state.cfg.grace + Duration::from_secs(5)).await;
        };
        tokio::select! {
            r = serving => r.context("serving HTTP")?,
            _ = deadline => eprintln!("kiln: connections still open after the grace period; closing them"),
        }
        cancel.store(true, Ordering::SeqCst);
        drop(state);
        tokio::task::spawn_blocking(move || scheduler.join()).await.ok();
        Ok(())
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server on a new tokio runtime until Ctrl-C or SIGTERM (the `kiln serve` command).
pub fn run_blocking(model: Model, cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let non_local = !is_loopback(&cfg.host);
        let has_key = cfg.api_key.is_some();
        let (parallel, ctx, queue) = (cfg.parallel, cfg.ctx, cfg.queue);
        let server = Server::bind(Arc::new(model), cfg).await?;
        let addr = server.local_addr()?;
        eprintln!(
            "kiln: serving {} on http://{addr}/v1 ({parallel} slots × {ctx} tokens, queue {queue}{})",
            server.model_id(),
            if has_key { ", API key required" } else { "" }
        );
        if non_local && !has_key {
            eprintln!(
                "kiln: warning: listening on a non-local address without --api-key: anyone who can reach it can use it"
            );
        }
        server.serve(shutdown_signal()).await?;
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Every endpoint but `/health` needs `Authorization: Bearer KEY` when a key is set. The keys
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
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| Sha256::digest(k.trim().as_bytes()));
    let ok = presented.is_some_and(|got| got.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
    if !ok {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
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
