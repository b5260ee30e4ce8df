//! The accept loop, one task per connection, the maintenance ticker, and shutdown.
//!
//! Each connection is one task: it reads frames, hands them to [`cmd::handle`], and writes replies in the order
//! they become ready, batching what is ready at once into one socket write. The replies that changed state,
//! among the requests one read delivered, wait together for one durability ticket, without holding up the
//! replies behind them, so pipelined writes on one connection share one log round; ops that wait (long-poll
//! `lease`, `get` with `wait_ms`) are polled by the same task and answer when done.
//!
//! Shutdown is one [`CancellationToken`]: the accept loop stops, every connection stops reading, waiting ops
//! answer with what they have, the replies still due are written, leases still held are released, and the store
//! is flushed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_client::codec::FrameCodec;
use broker_client::proto::ErrorCode;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::cmd::{self, ConnInfo, Outcome, ReplyFrame, Session, Shared};
use crate::config::Config;
use crate::engine::Engine;
use crate::framing::{Budget, Request, RequestCodec};
use crate::store::commit::Durable;
use crate::store::{Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The settings are unsafe to serve with ([`Config::check_security`]).
    #[error("{0}")]
    Insecure(String),
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// Why.
        source: StoreError,
    },
}

/// How long a closing connection may take to write its last replies.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    http: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl ServerHandle {
    /// The address it listens on (with the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP listener's address, if it has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The single node's store, for in-process callers (tests drive [`Store::tick`] after moving a manual
    /// clock). Panics on a daemon over a shared store.
    pub fn store(&self) -> &Arc<Store> {
        self.shared.engine.as_local().expect("the daemon runs the single node's store")
    }

    /// The single node's store, if the daemon runs it (tests that also run over a shared store).
    pub fn local_store(&self) -> Option<&Arc<Store>> {
        self.shared.engine.as_local()
    }

    /// A token that stops the server when cancelled (signal handlers use it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Resolves when the server has been asked to stop.
    pub async fn stopped(&self) {
        self.shared.shutdown.cancelled().await
    }

    /// Stops accepting, finishes in-flight replies, releases leases, flushes the store.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.shared.shutdown.cancel();
        let _ = self.accept.await;
        let _ = self.ticker.await;
        if let Some(http) = self.http {
            let _ = http.await;
        }
        match &self.shared.engine {
            Engine::Local(store) => store.close().await?,
            Engine::Postgres(store) => store.close(),
        }
        tracing::info!("shut down cleanly");
        Ok(())
    }
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<ServerHandle, ServerError> {
    config.check_security().map_err(ServerError::Insecure)?;
    if config.tokens.is_empty() && !config.listen.ip().is_loopback() {
        tracing::warn!(addr = %config.listen, "serving without tokens on a non-loopback address (--insecure-no-auth)");
    }
    for token in config.tokens.iter().filter(|t| t.token.len() < 16) {
        tracing::warn!(name = %token.name, "a token shorter than 16 bytes is easy to guess: use a long random one");
    }
    let listener = bind(config.listen, config.listen_backlog)
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let http_listener = match config.http_addr().map_err(ServerError::Insecure)? {
        None => None,
        Some(http) => match crate::http::bind(http).await {
            Ok(listener) => Some(listener),
            // The default address may be taken (another daemon on this machine): serve without it, and say so.
            Err(e) if config.http_listen.is_none() => {
                tracing::warn!(addr = %http, error = %e, "no HTTP listener (/metrics, /healthz): set http_listen");
                None
            }
            Err(source) => return Err(ServerError::Bind { addr: http, source }),
        },
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let tls = crate::tls::acceptor(&config).map_err(ServerError::Tls)?;
    let engine = match config.store.as_deref().filter(|store| *store != "local") {
        None => Engine::Local(Arc::new(
            Store::open(&config, clock)
                .map_err(|source| ServerError::Store { dir: config.data_dir.display().to_string(), source })?,
        )),
        Some(url) => Engine::Postgres(Arc::new(
            crate::store::pg::PgStore::open(url, &config, clock)
                .await
                .map_err(|source| ServerError::Store { dir: crate::store::pg::redact(url), source })?,
        )),
    };
    let shared = Arc::new(Shared {
        engine,
        config,
        started: Instant::now(),
        connections: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
    });
    let ticker = tokio::spawn(run_ticker(shared.clone()));
    let accept = tokio::spawn(accept_loop(listener, shared.clone(), tls));
    let http = http_listener.map(|listener| tokio::spawn(crate::http::serve(listener, shared.clone())));
    if let Some(http) = http_addr {
        tracing::info!(%http, "HTTP listener: /metrics, /healthz, /readyz");
    }
    tracing::info!(%addr, data_dir = %shared.config.data_dir.display(), fsync = shared.config.fsync.as_str(), "listening");
    Ok(ServerHandle { addr, http_addr, http, shared, accept, ticker })
}

/// A listener with the configured backlog (tokio's `bind` uses 128: in a burst of connects some waited about 1 s).
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.max(1))
}

/// How often the data directory's size is checked (see [`Store::shrink_if_bloated`]).
const DISK_CHECK_EVERY: Duration = Duration::from_secs(10);

async fn run_ticker(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_millis(shared.config.tick_ms.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The data directory check runs beside the ticks, not in them: a rewrite copies the whole journal, and
    // schedules and lease deadlines must not wait for it.
    let mut disk_check: Option<JoinHandle<()>> = None;
    let mut checked = tokio::time::Instant::now() - DISK_CHECK_EVERY;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shared.shutdown.cancelled() => break,
        }
        let store = match &shared.engine {
            Engine::Local(store) => store.clone(),
            Engine::Postgres(store) => {
                if let Err(e) = store.tick().await {
                    tracing::warn!(error = %e, "maintenance tick failed");
                }
                continue;
            }
        };
        let ticked = store.clone();
        match tokio::task::spawn_blocking(move || ticked.tick()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "maintenance tick failed"),
            Err(e) => tracing::error!(error = %e, "maintenance tick panicked"),
        }
        if checked.elapsed() >= DISK_CHECK_EVERY && disk_check.as_ref().is_none_or(|check| check.is_finished()) {
            checked = tokio::time::Instant::now();
            let store = store.clone();
            disk_check = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = store.shrink_if_bloated() {
                    tracing::error!(error = %e, "data directory rewrite failed");
                }
            }));
        }
    }
    // A rewrite in progress holds the store: let it finish before the store closes.
    if let Some(check) = disk_check {
        let _ = check.await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    // Beyond the limit, a few slots for admins: a client in one is refused after its hello unless it is admin.
    let reserve = Arc::new(Semaphore::new(shared.config.admin_reserved_connections));
    let budget = Budget::new(shared.config.max_unfinished_bytes);
    let connections = TaskTracker::new();
    let next_conn = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (permit, reserved) = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => (permit.expect("semaphore never closed"), false),
            permit = reserve.clone().acquire_owned() => (permit.expect("semaphore never closed"), true),
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                // A slot of the general pool may have freed while this one waited on a reserved permit: take it,
                // so the reserved slot stays for an admin.
                let (permit, reserved) = match reserved.then(|| limit.clone().try_acquire_owned().ok()).flatten() {
                    Some(general) => (general, false),
                    None => (permit, reserved),
                };
                let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let budget = budget.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tls {
                        None => {
                            let (read, write) = stream.into_split();
                            run_connection(shared, read, write, peer, conn, reserved, budget).await;
                        }
                        Some(acceptor) => {
                            // The handshake counts against the hello timeout.
                            let limit = Duration::from_millis(shared.config.hello_timeout_ms);
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    let (read, write) = tokio::io::split(stream);
                                    run_connection(shared, read, write, peer, conn, reserved, budget).await;
                                }
                                Ok(Err(e)) => tracing::info!(conn, %peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::info!(conn, %peer, "no TLS handshake within hello_timeout_ms"),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    connections.close();
    connections.wait().await;
}

/// Replies not ready yet: the ones waiting for their durability ticket, or a waiting op (long-poll `lease`,
/// `get`).
type Pending = Pin<Box<dyn Future<Output = Vec<ReplyFrame>> + Send>>;

/// A connection's replies not ready yet, and how many they are: backpressure counts replies, not futures (one
/// future holds the replies of a whole socket read).
#[derive(Default)]
struct PendingReplies {
    futures: FuturesUnordered<Pending>,
    replies: usize,
}

impl PendingReplies {
    fn push(&mut self, replies: usize, future: Pending) {
        self.replies += replies;
        self.futures.push(future);
    }

    /// Replies waiting.
    fn len(&self) -> usize {
        self.replies
    }

    fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    /// The next replies that become ready.
    async fn next(&mut self) -> Option<Vec<ReplyFrame>> {
        let frames = self.futures.next().await?;
        self.replies = self.replies.saturating_sub(frames.len());
        Some(frames)
    }
}

/// What a connection has to do next.
enum Ready {
    /// What the reader gave.
    Frame(Option<Result<Request, std::io::Error>>),
    /// Pending replies that became ready.
    Replies(Vec<ReplyFrame>),
    /// Time to look at the connection's deadlines.
    Check,
}

/// How often a connection looks at its deadlines when none is nearer (a frame may begin to arrive meanwhile).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why a connection is closed by the daemon, if one of its deadlines has passed.
fn overdue(
    shared: &Shared,
    session: &Session,
    reader: &RequestCodec,
    opened: Instant,
    last_active: Instant,
    idle: bool,
) -> Option<&'static str> {
    let config = &shared.config;
    let now = Instant::now();
    if !session.greeted && now >= opened + Duration::from_millis(config.hello_timeout_ms) {
        return Some("no hello within hello_timeout_ms");
    }
    if reader.unfinished_since().is_some_and(|since| now >= since + Duration::from_millis(config.frame_timeout_ms)) {
        return Some("a frame did not complete within frame_timeout_ms");
    }
    if idle && config.idle_timeout_secs > 0 && now >= last_active + Duration::from_secs(config.idle_timeout_secs) {
        return Some("idle for idle_timeout_secs");
    }
    None
}

/// The next moment a connection's deadlines should be looked at.
fn next_check(
    shared: &Shared,
    session: &Session,
    reader: &RequestCodec,
    opened: Instant,
    last_active: Instant,
) -> tokio::time::Instant {
    let config = &shared.config;
    // A frame may begin to arrive while the connection waits: look again within frame_timeout_ms.
    let mut at = Instant::now() + CHECK_EVERY.min(Duration::from_millis(config.frame_timeout_ms.max(1)));
    if !session.greeted {
        at = at.min(opened + Duration::from_millis(config.hello_timeout_ms));
    }
    if let Some(since) = reader.unfinished_since() {
        at = at.min(since + Duration::from_millis(config.frame_timeout_ms));
    }
    if config.idle_timeout_secs > 0 {
        at =
            at.max(Instant::now()).min(last_active + Duration::from_secs(config.idle_timeout_secs)).max(Instant::now());
    }
    tokio::time::Instant::from_std(at)
}

async fn run_connection<R, W>(
    shared: Arc<Shared>,
    read: R,
    write: W,
    peer: SocketAddr,
    conn: u64,
    reserved: bool,
    budget: Arc<Budget>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    shared.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(
        conn,
        ConnInfo {
            client: String::new(),
            addr: peer.to_string(),
            connected_at_ms: shared.tasks().now_ms(),
            leases: false,
            queues: Vec::new(),
        },
    );
    tracing::debug!(conn, %peer, "connected");
    let mut frames = FramedRead::new(read, RequestCodec::new(shared.config.max_frame_bytes, budget));
    let mut out = ReplySink {
        sink: FramedWrite::new(write, FrameCodec::new(usize::MAX)),
        broken: false,
        timeout: Duration::from_millis(shared.config.write_timeout_ms.max(1)),
    };
    let mut pending = PendingReplies::default();
    // Replies not written yet (waiting for a flush, or a waiting op) count against it: past it, this socket is not
    // read until some go out (backpressure rather than buffering without bound).
    let in_flight = shared.config.max_in_flight.max(1);
    let mut session = Session::new(conn, reserved);
    let opened = Instant::now();
    let mut last_active = opened;
    let check = tokio::time::sleep_until(next_check(&shared, &session, frames.decoder(), opened, last_active));
    tokio::pin!(check);

    // Read a request, answer what is ready, and repeat while more is ready at once; then write it all with one
    // flush. Replies that must wait (for a flush, or a waiting op) go out as they become ready, never holding up
    // the ones behind them. Writing to a peer that does not read blocks only this connection, and shutdown still
    // gets through.
    let mut drain_deadline = None;
    'serve: loop {
        // One timer for the connection's deadlines, moved only when one must come sooner (or after it fired):
        // arming a fresh timer for every socket read costs the hot path.
        let check_at = next_check(&shared, &session, frames.decoder(), opened, last_active);
        if check_at < check.deadline() {
            check.as_mut().reset(check_at);
        }
        let first = tokio::select! {
            biased;
            Some(frames) = pending.next(), if !pending.is_empty() => Ready::Replies(frames),
            _ = shared.shutdown.cancelled() => break 'serve,
            // A peer that stops reading stops being read.
            frame = frames.next(), if pending.len() < in_flight => Ready::Frame(frame),
            _ = &mut check => Ready::Check,
        };
        if matches!(first, Ready::Check) {
            check.as_mut().reset(next_check(&shared, &session, frames.decoder(), opened, last_active));
            // A worker that holds leases is busy with them, however silent.
            let idle = pending.is_empty() && !shared.tasks().holds_leases(conn);
            if let Some(why) = overdue(&shared, &session, frames.decoder(), opened, last_active, idle) {
                tracing::info!(conn, %peer, why, "closing the connection");
                break 'serve;
            }
            continue;
        }
        last_active = Instant::now();
        let work = async {
            let mut next = Some(first);
            let mut durable = Vec::new();
            let mut open = true;
            while let Some(ready) = next.take() {
                match ready {
                    Ready::Frame(frame) => {
                        if !serve_frame(&shared, &mut session, frame, &mut out, &mut pending, &mut durable).await {
                            open = false;
                            break;
                        }
                    }
                    Ready::Replies(frames) => out.feed_all(frames).await,
                    Ready::Check => {}
                }
                // Whatever else is ready now joins the same socket write, up to the in-flight limit.
                if pending.len() + durable.len() < in_flight {
                    next = frames.next().now_or_never().map(Ready::Frame);
                }
                if next.is_none() {
                    next = pending.next().now_or_never().flatten().map(Ready::Replies);
                }
            }
            // One ticket covers every change made by the requests handled above.
            if !durable.is_empty() {
                // Only the single node's ops ask for a flush (a shared store's replies wait for their commit).
                let flushed = shared.engine.as_local().map_or_else(Durable::ready, |store| store.durable());
                pending.push(durable.len(), Box::pin(after_flush(durable, flushed)));
            }
            out.flush().await;
            // A peer that does not take its replies within write_timeout_ms is dropped.
            open && !out.broken
        };
        // Writing blocks while the peer does not read; shutdown must still get through, without dropping the
        // replies in hand: they get the drain time.
        tokio::pin!(work);
        tokio::select! {
            biased;
            open = &mut work => if !open { break 'serve },
            _ = shared.shutdown.cancelled() => {
                let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                drain_deadline = Some(deadline);
                let _ = tokio::time::timeout_at(deadline, work).await;
                break 'serve;
            }
        }
    }

    // Waiting ops answer now; then every reply still due is written (each after its flush). A peer that does not
    // read them gets DRAIN_TIMEOUT, then its socket is dropped.
    session.closing.cancel();
    let drain = async {
        while let Some(frames) = pending.next().await {
            out.feed_all(frames).await;
        }
        out.flush().await;
    };
    let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN_TIMEOUT);
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        tracing::warn!(conn, "peer is not reading its replies; closing without them");
    }
    let released = match shared.tasks().release_connection(conn, shared.shutdown.is_cancelled()).resolve().await {
        Ok(released) => released,
        Err(e) => {
            // Their deadlines pass, and the tick (of any daemon) puts them back.
            tracing::warn!(conn, error = %e, "could not release a closed connection's leases now");
            0
        }
    };
    if released > 0 {
        tracing::info!(conn, released, "connection closed; its leases went back to their queues");
    }
    shared.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
    tracing::debug!(conn, "disconnected");
}

/// Handles what the reader gave: a request (its reply written now, or left pending), an oversized frame (an
/// error reply), or the end of the stream. Returns false when the connection is done reading.
async fn serve_frame(
    shared: &Arc<Shared>,
    session: &mut Session,
    frame: Option<Result<Request, std::io::Error>>,
    out: &mut ReplySink<impl AsyncWrite + Unpin>,
    pending: &mut PendingReplies,
    durable: &mut Vec<(u64, ReplyFrame)>,
) -> bool {
    match frame {
        Some(Ok(Request::Message(bytes))) => match handle(shared, session, bytes).await {
            Outcome::Reply(frame, None) => out.feed(frame).await,
            Outcome::Reply(frame, Some(id)) => durable.push((id, frame)),
            Outcome::Wait(waiting) => pending.push(1, Box::pin(waiting.map(|frame| vec![frame]))),
        },
        Some(Ok(Request::TooLarge(len))) => {
            let max = shared.config.max_frame_bytes;
            let message = format!("frame of {len} bytes exceeds the maximum of {max}; it was skipped");
            out.feed(cmd::error_frame(None, ErrorCode::FrameTooLarge, &message)).await;
        }
        Some(Ok(Request::Busy(len))) => {
            let message = format!(
                "frame of {len} bytes skipped: the daemon holds as many unfinished large frames as it allows \
                 (max_unfinished_bytes); retry it later"
            );
            out.feed(cmd::error_frame(None, ErrorCode::Busy, &message)).await;
        }
        Some(Err(e)) => {
            tracing::debug!(conn = session.conn, error = %e, "read failed");
            return false;
        }
        None => return false,
    }
    true
}

/// Requests at least this large are checked and applied on a blocking thread.
const LARGE_REQUEST: usize = 1 << 20;

/// Handles a request. A large one (its every byte is walked, several times, and a hostile one can take a
/// third of a second) runs on a blocking thread: this connection waits for it, the runtime's threads serve the
/// others meanwhile.
async fn handle(shared: &Arc<Shared>, session: &mut Session, bytes: bytes::Bytes) -> Outcome {
    if bytes.len() < LARGE_REQUEST {
        return cmd::handle(shared, session, &bytes);
    }
    let (shared_, mut copy) = (shared.clone(), session.clone());
    let ran = tokio::task::spawn_blocking(move || {
        let outcome = cmd::handle(&shared_, &mut copy, &bytes);
        (outcome, copy)
    })
    .await;
    match ran {
        Ok((outcome, copy)) => {
            // What the request changed of the session (a `hello`).
            *session = copy;
            outcome
        }
        Err(e) => Outcome::Reply(cmd::error_frame(None, ErrorCode::Internal, &format!("request failed: {e}")), None),
    }
}

/// The replies, once the changes they report are durable; if that fails, an error for each request instead.
async fn after_flush(replies: Vec<(u64, ReplyFrame)>, durable: Durable) -> Vec<ReplyFrame> {
    match durable.wait().await {
        Ok(()) => replies.into_iter().map(|(_, frame)| frame).collect(),
        Err(e) => {
            let message = format!("not durable: {e}");
            replies.into_iter().map(|(id, _)| cmd::error_frame(Some(id), ErrorCode::Internal, &message)).collect()
        }
    }
}

/// The socket's write half; after a write error it drops what it is given, so the connection's other tasks never
/// block on a dead peer.
struct ReplySink<W> {
    sink: FramedWrite<W, FrameCodec>,
    broken: bool,
    /// A write that makes no progress this long breaks the sink (`write_timeout_ms`).
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> ReplySink<W> {
    async fn feed(&mut self, frame: ReplyFrame) {
        if !self.broken
            && !matches!(tokio::time::timeout(self.timeout, self.sink.feed(Bytes::from(frame))).await, Ok(Ok(())))
        {
            self.broken = true;
        }
    }

    async fn feed_all(&mut self, frames: Vec<ReplyFrame>) {
        for frame in frames {
            self.feed(frame).await;
        }
    }

    async fn flush(&mut self) {
        if !self.broken
            && !matches!(tokio::time::timeout(self.timeout, SinkExt::<Bytes>::flush(&mut self.sink)).await, Ok(Ok(())))
        {
            self.broken = true;
        }
    }
}
