//! The accept loop, one task per connection, the maintenance ticker, and shutdown.
//!
//! Each connection has a reader (this module's loop: frames → [`cmd::handle`]) and a writer task that sends
//! replies in the order they become ready. A reply that changed state waits in the writer for its flush ticket,
//! so pipelined writes on one connection share flushes; ops that wait (long-poll `lease`, `get` with `wait_ms`)
//! run on their own tasks and send their reply when done, never holding up the replies behind them.
//!
//! Shutdown is one [`CancellationToken`]: the accept loop stops, every connection stops reading, waiting ops
//! answer with what they have, writers drain, leases still held are released, and the store is flushed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_client::codec::{Frame, FrameCodec};
use broker_client::proto::ErrorCode;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::cmd::{self, ConnInfo, Outcome, ReplyFrame, Session, Shared};
use crate::config::Config;
use crate::store::flush::Durable;
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

/// How many replies may wait to be written per connection before the reader stops reading (backpressure).
const REPLY_QUEUE: usize = 1024;

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl ServerHandle {
    /// The address it listens on (with the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store, for in-process callers (tests drive [`Store::tick`] after moving a manual clock).
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
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
        self.shared.store.close().await?;
        tracing::info!("shut down cleanly");
        Ok(())
    }
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<ServerHandle, ServerError> {
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let store = Store::open(&config, clock)
        .map_err(|source| ServerError::Store { dir: config.data_dir.display().to_string(), source })?;
    let shared = Arc::new(Shared {
        store: Arc::new(store),
        config,
        started: Instant::now(),
        connections: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
    });
    let ticker = tokio::spawn(run_ticker(shared.clone()));
    let accept = tokio::spawn(accept_loop(listener, shared.clone()));
    tracing::info!(%addr, data_dir = %shared.config.data_dir.display(), fsync = shared.config.fsync.as_str(), "listening");
    Ok(ServerHandle { addr, shared, accept, ticker })
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
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.tick()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "maintenance tick failed"),
            Err(e) => tracing::error!(error = %e, "maintenance tick panicked"),
        }
        if checked.elapsed() >= DISK_CHECK_EVERY && disk_check.as_ref().is_none_or(|check| check.is_finished()) {
            checked = tokio::time::Instant::now();
            let store = shared.store.clone();
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

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    let connections = TaskTracker::new();
    let next_conn = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = shared.shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                connections.spawn(async move {
                    run_connection(shared, stream, peer, conn).await;
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

/// A reply on its way to the writer, with the flush it must wait for.
struct Outbound {
    frame: ReplyFrame,
    ticket: Option<(u64, Durable)>,
}

async fn run_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, conn: u64) {
    let _ = stream.set_nodelay(true);
    shared.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(
        conn,
        ConnInfo {
            client: String::new(),
            addr: peer.to_string(),
            connected_at_ms: shared.store.now_ms(),
            leases: false,
        },
    );
    tracing::debug!(conn, %peer, "connected");
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, FrameCodec::new(shared.config.max_frame_bytes));
    let (tx, rx) = mpsc::channel::<Outbound>(REPLY_QUEUE);
    let writer = tokio::spawn(write_loop(FramedWrite::new(write, FrameCodec::new(usize::MAX)), rx));
    let waiting = TaskTracker::new();
    let mut session = Session { conn, greeted: false, closing: CancellationToken::new() };
    let max_frame = shared.config.max_frame_bytes;

    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            _ = shared.shutdown.cancelled() => break,
        };
        let outbound = match frame {
            Some(Ok(Frame::Message(bytes))) => match cmd::handle(&shared, &mut session, &bytes) {
                Outcome::Reply(frame, ticket) => Outbound { frame, ticket },
                Outcome::Wait(pending) => {
                    let tx = tx.clone();
                    waiting.spawn(async move {
                        let frame = pending.await;
                        let _ = tx.send(Outbound { frame, ticket: None }).await;
                    });
                    continue;
                }
            },
            Some(Ok(Frame::TooLarge(len))) => Outbound {
                frame: cmd::error_frame(
                    None,
                    ErrorCode::FrameTooLarge,
                    &format!("frame of {len} bytes exceeds the maximum of {max_frame}; it was skipped"),
                ),
                ticket: None,
            },
            Some(Err(e)) => {
                tracing::debug!(conn, error = %e, "read failed");
                break;
            }
            None => break,
        };
        // A client that stops reading its replies fills the queue; shutdown must not wait on it.
        tokio::select! {
            sent = tx.send(outbound) => if sent.is_err() { break },
            _ = shared.shutdown.cancelled() => break,
        }
    }

    // Waiting ops answer now; then the writer drains every reply (each after its flush) and closes. A peer that
    // does not read them gets DRAIN_TIMEOUT, then its socket is dropped (which also ends the waiting ops' sends).
    session.closing.cancel();
    waiting.close();
    let mut writer = writer;
    let drain = async {
        waiting.wait().await;
        drop(tx);
        let _ = (&mut writer).await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(conn, "peer is not reading its replies; closing without them");
        writer.abort();
        waiting.wait().await;
    }
    let released = shared.store.release_connection(conn, shared.shutdown.is_cancelled());
    if released > 0 {
        tracing::info!(conn, released, "connection closed; its leases went back to their queues");
    }
    shared.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
    tracing::debug!(conn, "disconnected");
}

/// Writes replies as they become ready. A reply that waits for its flush does not hold up the replies behind
/// it (a `get` or `lease` answered in memory goes out at once); clients match replies by id.
async fn write_loop(sink: FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>, mut rx: mpsc::Receiver<Outbound>) {
    let mut waiting = FuturesUnordered::new();
    let mut out = ReplySink { sink, broken: false };
    loop {
        tokio::select! {
            // Replies waiting for a slow flush count against the same bound as queued ones (backpressure).
            next = rx.recv(), if waiting.len() < REPLY_QUEUE => match next {
                Some(Outbound { frame, ticket: None }) => out.feed(frame).await,
                Some(Outbound { frame, ticket: Some((id, durable)) }) => waiting.push(after_flush(id, frame, durable)),
                None => break,
            },
            Some(frame) = waiting.next(), if !waiting.is_empty() => out.feed(frame).await,
        }
        // Gather whatever else is ready now, then write it all with one flush.
        loop {
            if waiting.len() >= REPLY_QUEUE {
                break;
            }
            if let Ok(next) = rx.try_recv() {
                match next {
                    Outbound { frame, ticket: None } => out.feed(frame).await,
                    Outbound { frame, ticket: Some((id, durable)) } => waiting.push(after_flush(id, frame, durable)),
                }
            } else if let Some(Some(frame)) = waiting.next().now_or_never() {
                out.feed(frame).await;
            } else {
                break;
            }
        }
        out.flush().await;
    }
    // The reader is gone: the replies still waiting for their flush go out as it completes.
    while let Some(frame) = waiting.next().await {
        out.feed(frame).await;
    }
    out.flush().await;
}

async fn after_flush(id: u64, frame: ReplyFrame, durable: Durable) -> ReplyFrame {
    match durable.await {
        Ok(()) => frame,
        Err(e) => cmd::error_frame(Some(id), ErrorCode::Internal, &format!("not durable: {e}")),
    }
}

/// The socket's write half; after a write error it drops what it is given, so the connection's other tasks never
/// block on a dead peer.
struct ReplySink {
    sink: FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
    broken: bool,
}

impl ReplySink {
    async fn feed(&mut self, frame: ReplyFrame) {
        if !self.broken && self.sink.feed(Bytes::from(frame)).await.is_err() {
            self.broken = true;
        }
    }

    async fn flush(&mut self) {
        if !self.broken && SinkExt::<Bytes>::flush(&mut self.sink).await.is_err() {
            self.broken = true;
        }
    }
}
