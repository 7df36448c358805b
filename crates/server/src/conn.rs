//! The HTTP/1 transport: the accept loop, the connection cap, and the timeouts that keep slow or
//! idle clients from holding connections (and file descriptors) forever.
//!
//! axum's own `serve` has none of these, so connections are served here with hyper's HTTP/1
//! builder. Each connection task watches its own clock:
//! - a new connection must deliver a complete request head within `header_timeout` of being
//!   accepted;
//! - a kept-alive connection may wait `idle_timeout` for the first byte of its next request, and
//!   then has `header_timeout` from that byte to finish the head;
//! - while a request is in flight the transport sets no clock: the body (`body_timeout`) and the
//!   whole request (`request_timeout`) are timed by the [`limits`] middleware, where the answer
//!   (408, 504, an error event) can be written in the API's terms.
//!
//! Beyond `max_connections` open connections a new one is answered `503` with `Retry-After` and
//! closed, so that a flood of connections costs a bounded number of descriptors.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::{AppState, Config};

/// Descriptors kept back from the open-file limit for everything that is not a client
/// connection: the listener, the model file, stdio, the runtime's epoll and wakers, and the
/// connections being refused.
const FD_HEADROOM: u64 = 64;

/// Connections being answered 503 at the same time; past this a refused connection is closed
/// without an answer (its descriptor is freed at once instead of for up to `REFUSE_LINGER`).
const REFUSING_MAX: usize = 32;

/// How long a refused connection is kept open to deliver its 503 and read what the client sent
/// (closing a socket with unread input resets it, and the client may then lose the answer).
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// The default connection cap: what the process's open-file limit leaves after the headroom,
/// at most 1024.
pub fn default_max_connections() -> usize {
    let nofile = open_file_limit().unwrap_or(1024);
    // A tiny limit (below twice the headroom) still gets a quarter of it.
    let n = nofile.saturating_sub(FD_HEADROOM).max(nofile / 4).clamp(1, 1024);
    n as usize
}

/// The soft RLIMIT_NOFILE; `None` when it cannot be read or is unlimited.
pub(crate) fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local of that type.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux but not everywhere
        Some(u64::from(r.rlim_cur))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The timeouts a connection task enforces itself.
#[derive(Clone, Copy)]
struct Clocks {
    header: Duration,
    idle: Duration,
}

/// Open connections: the cap, the refusals, and the signal that tells them to finish.
pub(crate) struct Connections {
    clocks: Clocks,
    max: usize,
    /// One permit per open connection; all `max` back means none is open.
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    builder: http1::Builder,
    /// Set to true when the server stops accepting: connections close after their current request.
    drain: watch::Sender<bool>,
    /// The canned answer for a connection over the cap.
    refusal: Bytes,
    refused: u64,
    last_refusal_log: Option<Instant>,
    last_accept_error_log: Option<Instant>,
}

impl Connections {
    pub fn new(cfg: &Config) -> Connections {
        let mut builder = http1::Builder::new();
        // A client that shuts down its sending side after the request (`shutdown(SHUT_WR)`, `nc -N`)
        // still gets its answer. The cost: a FIN in the middle of a request is not taken as the
        // client leaving; a streamed answer notices at its next write, a non-streamed one when
        // it is written.
        builder.half_close(true).keep_alive(true);
        // The header clock is kept here, not by hyper: hyper's starts when the connection is
        // ready for a request, so an idle kept-alive connection could never wait longer than
        // the header timeout.
        builder.header_read_timeout(None);
        let err = ApiError::unavailable(format!(
            "too many open connections (the limit is {}, --max-connections); retry later",
            cfg.max_connections
        ));
        let body = err.body().to_string();
        let refusal = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        Connections {
            clocks: Clocks { header: cfg.header_timeout, idle: cfg.idle_timeout },
            max: cfg.max_connections,
            open: Arc::new(Semaphore::new(cfg.max_connections)),
            refusing: Arc::new(Semaphore::new(REFUSING_MAX)),
            builder,
            drain: watch::channel(false).0,
            refusal: Bytes::from(refusal),
            refused: 0,
            last_refusal_log: None,
            last_accept_error_log: None,
        }
    }

    /// Takes one accepted connection (or accept error) from the listener.
    pub async fn accept(&mut self, accepted: io::Result<(TcpStream, std::net::SocketAddr)>, app: &Router) {
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => return self.accept_error(e).await,
        };
        // Streamed tokens are small writes that must go out at once, not wait for an ACK.
        let _ = stream.set_nodelay(true);
        match self.open.clone().try_acquire_owned() {
            Ok(permit) => self.serve(stream, permit, app.clone()),
            Err(_) => self.refuse(stream),
        }
    }

    /// Stops every connection after its current request; idle ones close now.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once every connection has closed.
    pub async fn closed(&self) {
        // `max` fits u32: the configuration is checked when the server is bound.
        let n = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.open.acquire_many(n).await;
    }

    async fn accept_error(&mut self, e: io::Error) {
        use io::ErrorKind::*;
        // A connection that went away before it was accepted: nothing to do.
        if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
            return;
        }
        // Out of descriptors (EMFILE/ENFILE) or memory: the connection stays in the backlog and
        // accept fails again at once, so wait a little for connections to close instead of spinning.
        if self.last_accept_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            eprintln!("kiln: accepting a connection: {e} (open connections: {}); retrying", self.open_now());
            self.last_accept_error_log = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn open_now(&self) -> usize {
        self.max - self.open.available_permits()
    }

    fn refuse(&mut self, stream: TcpStream) {
        self.refused += 1;
        if self.last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            eprintln!(
                "kiln: {} connection(s) refused with 503: {} open, the limit (--max-connections)",
                self.refused, self.max
            );
            self.refused = 0;
            self.last_refusal_log = Some(Instant::now());
        }
        // Past REFUSING_MAX the stream is dropped here: closed without an answer.
        if let Ok(permit) = self.refusing.clone().try_acquire_owned() {
            let answer = self.refusal.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(REFUSE_LINGER, refuse(stream, answer)).await;
            });
        }
    }

    fn serve(&self, stream: TcpStream, permit: OwnedSemaphorePermit, app: Router) {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
        let conn = self.builder.serve_connection(io, Service { app, activity: activity.clone() });
        let mut drain = self.drain.subscribe();
        let clocks = self.clocks;
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                let deadline = activity.deadline(clocks);
                let wake = activity.wake.notified();
                let expiry = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // Errors here are the client's (bad HTTP, a reset); hyper has answered what
                    // could be answered.
                    _ = conn.as_mut() => break,
                    _ = drain.changed(), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Something changed (a request began or ended, a first byte came): new deadline.
                    _ = wake => {}
                    _ = expiry => {
                        // Between requests, nothing is lost by closing: the client was idle or
                        // too slow with its headers.
                        if activity.deadline(clocks).is_some_and(|d| d <= Instant::now()) {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Writes the 503, half-closes, and reads what the client sends until it closes (bounded by the
/// caller's timeout), so that the answer is not lost to a reset.
async fn refuse(mut stream: TcpStream, answer: Bytes) {
    let mut sent = 0;
    while sent < answer.len() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write(&answer[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    if std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// What a connection is doing, for its clocks. Times are nanoseconds since `epoch`, plus one
/// (0: not set).
struct Activity {
    epoch: Instant,
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// When the head now being read began: the accept for the first request, its first byte for
    /// later ones.
    head_started: AtomicU64,
    /// When the connection last became idle (its last response went out).
    idle_since: AtomicU64,
    /// Wakes the connection task to recompute its deadline.
    wake: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(1),
            idle_since: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, t: u64) -> Instant {
        self.epoch + Duration::from_nanos(t - 1)
    }

    /// When the connection must be closed unless something happens first; `None` while a
    /// request is in flight.
    fn deadline(&self, c: Clocks) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        // A deadline too far to represent is no deadline.
        match self.head_started.load(Ordering::SeqCst) {
            0 => self.at(self.idle_since.load(Ordering::SeqCst).max(1)).checked_add(c.idle),
            h => self.at(h).checked_add(c.header),
        }
    }

    /// Bytes arrived: on an idle connection they begin the next request's head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 && self.head_started.load(Ordering::SeqCst) == 0 {
            self.head_started.store(self.now(), Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        self.wake.notify_one();
        InFlight(self.clone())
    }
}

/// A request in flight: from its head until its response body is sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            a.idle_since.store(a.now(), Ordering::SeqCst);
            a.wake.notify_one();
        }
    }
}

/// The socket, reporting reads to the connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The Router as hyper's service, marking each request in flight until its body is sent.
struct Service {
    app: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Service {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let mut app = self.app.clone();
        Box::pin(async move {
            use tower_service::Service as S;
            // A Router is always ready; asking keeps to the tower contract.
            let Ok(()) = std::future::poll_fn(|cx| S::<hyper::Request<Incoming>>::poll_ready(&mut app, cx)).await;
            let Ok(resp) = app.call(req).await;
            Ok(resp.map(|body| Body::new(Guarded { inner: body, _in_flight: guard })))
        })
    }
}

/// A response body that holds its request's [`InFlight`] until it is sent or dropped.
struct Guarded {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request clocks, as middleware: the body must arrive within `body_timeout` of the head
/// (else 408 and the connection closes), and with `request_timeout` set the whole request must
/// end within it (else 504, or for a stream an error event and `[DONE]`). Also gives every 503
/// a `Retry-After`, whichever handler wrote it.
pub(crate) async fn limits(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let cfg = &st.cfg;
    let body_late = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = if http_body::Body::is_end_stream(&body) {
        body
    } else {
        Body::new(TimedBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(cfg.body_timeout)),
            limit: cfg.body_timeout,
            late: body_late.clone(),
        })
    };
    let req = Request::from_parts(parts, body);
    let mut resp = match cfg.request_timeout {
        None => next.run(req).await,
        Some(limit) => match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) if body_late.load(Ordering::SeqCst) => body_timeout_response(cfg.body_timeout),
            Err(_) => ApiError::request_timeout(limit).into_response(),
        },
    };
    if body_late.load(Ordering::SeqCst) {
        return body_timeout_response(cfg.body_timeout);
    }
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE && !resp.headers().contains_key(header::RETRY_AFTER) {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    if let Some(limit) = cfg.request_timeout {
        let sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if sse {
            let tail = format!("data: {}\n\ndata: [DONE]\n\n", ApiError::request_timeout(limit).body());
            // The deadline counts from the request's head, like the one above.
            let deadline = started.checked_add(limit).map(|d| Box::pin(tokio::time::sleep_until(d)));
            if let Some(deadline) = deadline {
                resp = resp.map(|b| Body::new(StreamDeadline { inner: Some(b), deadline, tail: Some(tail.into()) }));
            }
        }
    }
    resp
}

/// 408, and the connection closes: the rest of the body may still be on its way.
fn body_timeout_response(limit: Duration) -> Response {
    let mut r = ApiError::body_timeout(limit).into_response();
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A request body that fails once `deadline` passes before it has all arrived.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
    /// Set when the deadline fired, for the middleware to answer 408 whatever the handler made
    /// of the read error.
    late: Arc<AtomicBool>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.late.store(true, Ordering::SeqCst);
            let msg = format!("the request body did not arrive within {} s", self.limit.as_secs_f64());
            return Poll::Ready(Some(Err(axum::Error::new(io::Error::new(io::ErrorKind::TimedOut, msg)))));
        }
        Poll::Pending
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A server-sent event stream cut at `deadline`: the events so far, then `tail` (an error
/// event and `[DONE]`). Dropping the inner stream drops the request's event channel, which
/// the scheduler takes as the client gone and frees the slot.
struct StreamDeadline {
    inner: Option<Body>,
    deadline: Pin<Box<Sleep>>,
    tail: Option<Bytes>,
}

impl http_body::Body for StreamDeadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // The deadline first: a stream that always has an event ready would never let it fire.
        // Each inner frame is one whole event, so the cut falls between events.
        if self.inner.is_none() || self.deadline.as_mut().poll(cx).is_ready() {
            self.inner = None;
            return Poll::Ready(self.tail.take().map(|t| Ok(Frame::data(t))));
        }
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.inner = None;
                self.tail = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.tail.is_none()
    }
}
