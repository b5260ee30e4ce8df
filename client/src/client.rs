//! The async client: a cheap-to-clone handle over one TCP connection to the daemon.
//!
//! A background task owns the socket. Callers hand it encoded requests; it writes them as they come (so many
//! requests are in flight at once: pipelining) and routes each reply to its caller by request id. A blocking call
//! such as a long-poll `lease` or a waiting `get` therefore never holds up the others on the same connection.
//!
//! The client never retries on its own: a request whose connection died fails with [`ErrorKind::Closed`], and
//! the caller decides (enqueue with a client-chosen id is safe to retry: the daemon returns the existing task).
//!
//! Several addresses: [`ConnectOptions`] may hold a list (`tcp://a:7420,b:7420`), for stateless daemons that
//! serve one shared store. A connect tries them in turn, starting where the last one left off, and stops at the
//! first that says hello; the worker runtime moves to the next address when it reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{check_msgpack, Frame, FrameCodec, MAX_DEPTH};
use crate::error::{Error, ErrorKind};
use crate::proto::{self, *};

/// The callers waiting for replies, and why the connection closed once it has.
#[derive(Default)]
struct PendingState {
    /// Each waiter gets the whole reply frame, whose body it decodes into the type it wants.
    waiters: HashMap<u64, oneshot::Sender<Result<Bytes, Error>>>,
    closed: Option<Error>,
}

type Pending = Arc<Mutex<PendingState>>;

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, PendingState> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to connect: the daemon's address (or several), the token, the name shown by `broker stat`, and the bounds.
///
/// Clones share the place in the address list where the next connect starts ([`ConnectOptions::move_past`]).
#[derive(Clone)]
pub struct ConnectOptions {
    /// The addresses as given, comma-separated, without the scheme and token (for messages and logs).
    addr: String,
    /// Each `HOST:PORT` of the list, in order; one for a single address.
    addrs: Vec<String>,
    /// The index in `addrs` the next connect tries first: past the last address that failed.
    cursor: Arc<AtomicUsize>,
    token: Option<String>,
    /// `tls://`: speak TLS, trusting the Mozilla roots and `tls_ca`.
    tls: bool,
    tls_ca: Option<std::path::PathBuf>,
    name: String,
    max_frame: usize,
    connect_timeout: Duration,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            addr: DEFAULT_ADDR.to_string(),
            addrs: vec![DEFAULT_ADDR.to_string()],
            cursor: Arc::new(AtomicUsize::new(0)),
            token: None,
            tls: false,
            tls_ca: None,
            name: default_name(),
            max_frame: DEFAULT_MAX_REPLY,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `tcp://[[USER]:TOKEN@]HOST:PORT[,HOST:PORT...]` or `HOST:PORT[,...]` → (the addresses, token). The token is
/// the URL's password, or its user part when there is no password; given once, it applies to every address.
fn split_url_list(url: &str) -> (Vec<String>, Option<String>) {
    let (hosts, token) = split_url(url);
    let addrs: Vec<String> = hosts.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
    // Nothing but commas and spaces: keep the text as it was, so the connect error shows what was given.
    let addrs = if addrs.is_empty() { vec![hosts] } else { addrs };
    (addrs, token)
}

/// `tcp://[[USER]:TOKEN@]HOST:PORT` or `HOST:PORT` → (`HOST:PORT`, token). The token is the URL's password, or its
/// user part when there is no password.
fn split_url(url: &str) -> (String, Option<String>) {
    let rest = ["tcp://", "broker://", "tls://"].iter().find_map(|scheme| url.strip_prefix(scheme)).unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let token = match userinfo.split_once(':') {
                Some((_, password)) => password,
                None => userinfo,
            };
            (host.to_string(), (!token.is_empty()).then(|| token.to_string()))
        }
        None => (rest.to_string(), None),
    }
}

/// The TLS client configuration: the Mozilla roots, and the certificates of `ca` (a PEM file) if given.
fn tls_connector(ca: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, Error> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(ca) = ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::new(ErrorKind::Connect, format!("cannot read the CA file {}: {e}", ca.display())))?;
        for cert in certs {
            roots.add(cert).map_err(|e| Error::new(ErrorKind::Connect, format!("CA file {}: {e}", ca.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Connect, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The default limit on a reply frame: twice the daemon's default `max_frame_bytes`, and room to spare.
pub const DEFAULT_MAX_REPLY: usize = 64 * 1024 * 1024;

fn default_name() -> String {
    format!("rust-client@{}", std::process::id())
}

impl ConnectOptions {
    /// Options for the daemon at `addr`: `HOST:PORT`, or a URL `tcp://HOST:PORT` that may carry the token
    /// (`tcp://:TOKEN@HOST:PORT`). Without a token in the URL, the one in `BROKER_TOKEN` is used, if set.
    ///
    /// `tls://HOST:PORT` speaks TLS: the daemon's certificate must chain to a Mozilla root or to the CA file in
    /// `BROKER_TLS_CA` (or [`ConnectOptions::tls_ca`]) and name HOST.
    ///
    /// Several daemons serving one shared store: a comma-separated list, `HOST:PORT,HOST:PORT`, with the scheme
    /// and the token given once for all (`tcp://:TOKEN@a:7420,b:7420`, `tls://a:7420,b:7420`). [`connect`]
    /// tries them in order, starting after the last that failed, and takes the first that says hello.
    ///
    /// [`connect`]: ConnectOptions::connect
    pub fn new(addr: impl Into<String>) -> Self {
        let url = addr.into();
        let tls = url.starts_with("tls://");
        let (addrs, token) = split_url_list(&url);
        let token = token.or_else(|| std::env::var("BROKER_TOKEN").ok().filter(|t| !t.is_empty()));
        let tls_ca = std::env::var_os("BROKER_TLS_CA").filter(|p| !p.is_empty()).map(Into::into);
        ConnectOptions { addr: addrs.join(","), addrs, token, tls, tls_ca, ..Default::default() }
    }

    /// Trusts the certificates in this PEM file for `tls://` (besides the Mozilla roots).
    pub fn tls_ca(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Options for the address in `BROKER_ADDR`, or the default `127.0.0.1:7420` (and `BROKER_TOKEN`).
    pub fn from_env() -> Self {
        let addr = std::env::var("BROKER_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_string());
        ConnectOptions::new(addr)
    }

    /// The token `hello` carries (a daemon with tokens configured requires one; its role decides what this
    /// connection may do).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The name this connection gives in `hello`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The largest reply frame accepted (default 64 MiB: a daemon's reply is at most about twice its largest
    /// request, 16 MiB by default; see proto.md §10).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How long to wait for the TCP connect and the hello (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The address these options connect to (the addresses, comma-separated, for a list).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Each address of the list, in the order given (one for a single address).
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Makes the next connect (of these options or any clone) start with the address after `addr`: call it when
    /// a connection to `addr` failed after it was made (lost, or its daemon cannot reach the shared store). The
    /// worker runtime does. No effect with a single address, or an address not in the list.
    pub fn move_past(&self, addr: &str) {
        if let Some(index) = self.addrs.iter().position(|a| a == addr) {
            self.cursor.store((index + 1) % self.addrs.len(), Ordering::Relaxed);
        }
    }

    /// Connects and says hello.
    ///
    /// With several addresses, tries each in turn (each within the connect timeout), starting with the one after
    /// the last that failed, and returns the first connection made. A daemon that refuses the hello for a reason
    /// another would share (`unauthorized`, `unsupported_version`) ends the attempt with that error; when every
    /// address fails, the [`ErrorKind::Connect`] error names each one and why.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.addrs.len() <= 1 {
            let addr = self.addrs.first().cloned().unwrap_or_default();
            return self.connect_to(&addr).await;
        }
        let count = self.addrs.len();
        let start = self.cursor.load(Ordering::Relaxed) % count;
        let mut failures = Vec::with_capacity(count);
        for index in (start..count).chain(0..start) {
            let addr = &self.addrs[index];
            match self.connect_to(addr).await {
                Ok(client) => {
                    self.cursor.store(index, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) if !worth_trying_next(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(addr = %addr, error = %e, "cannot connect; trying the next address");
                    self.cursor.store((index + 1) % count, Ordering::Relaxed);
                    let message = e.to_string();
                    failures.push(if message.contains(addr.as_str()) { message } else { format!("{addr}: {message}") });
                }
            }
        }
        Err(Error::new(
            ErrorKind::Connect,
            format!("cannot connect to any of {}: {}", self.addrs.join(", "), failures.join("; ")),
        ))
    }

    /// Connects to one address of the list, within the connect timeout.
    async fn connect_to(&self, addr: &str) -> Result<Client, Error> {
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, Client::connect_inner(self.clone(), addr.to_string())).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(ErrorKind::Connect, format!("connect to {addr}: timed out after {timeout:?}"))),
        }
    }
}

/// Whether a failed connect to one address of a list is worth trying on the next: a daemon that is not there,
/// drops the connection, shuts down or cannot reach its store, yes; one that refuses the token or the protocol
/// version, no (the others share its configuration and would say the same).
fn worth_trying_next(error: &Error) -> bool {
    match error.kind() {
        ErrorKind::Server => error.is(ErrorCode::ShuttingDown) || error.is(ErrorCode::StoreUnavailable),
        ErrorKind::Encode => false,
        ErrorKind::Connect | ErrorKind::Closed | ErrorKind::Protocol => true,
    }
}

struct Outgoing {
    id: u64,
    frame: Vec<u8>,
    reply: oneshot::Sender<Result<Bytes, Error>>,
}

struct Shared {
    /// The `HOST:PORT` this connection went to (one of the options' list).
    addr: String,
    next_id: AtomicU64,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    pending: Pending,
    server: HelloReply,
}

/// A connection to the daemon. Clone it freely: clones share the connection and may be used from many tasks.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.shared.server.server).finish()
    }
}

impl Client {
    /// Connects to `addr` with default options.
    pub async fn connect(addr: impl Into<String>) -> Result<Client, Error> {
        ConnectOptions::new(addr).connect().await
    }

    async fn connect_inner(options: ConnectOptions, addr: String) -> Result<Client, Error> {
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let pending: Pending = Arc::new(Mutex::new(PendingState::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        if options.tls {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| Error::new(ErrorKind::Connect, format!("tls://{addr}: {e}")))?;
            let stream = tls_connector(options.tls_ca.as_deref())?
                .connect(name, stream)
                .await
                .map_err(|e| Error::new(ErrorKind::Connect, format!("TLS with {addr}: {e}")))?;
            let (read, write) = tokio::io::split(stream);
            tokio::spawn(write_loop(FramedWrite::new(write, FrameCodec::new(usize::MAX)), rx, pending.clone()));
            tokio::spawn(read_loop(FramedRead::new(read, FrameCodec::new(options.max_frame)), pending.clone()));
        } else {
            let (read, write) = stream.into_split();
            tokio::spawn(write_loop(FramedWrite::new(write, FrameCodec::new(usize::MAX)), rx, pending.clone()));
            tokio::spawn(read_loop(FramedRead::new(read, FrameCodec::new(options.max_frame)), pending.clone()));
        }

        // Say hello on the raw channel before the handle exists.
        let hello = Hello { version: PROTOCOL_VERSION, client: options.name.clone(), token: options.token.clone() };
        let frame = proto::encode(&RequestEnvelope { id: 0, op: op::HELLO, body: &hello })?;
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Outgoing { id: 0, frame, reply: reply_tx }).map_err(|_| Error::closed())?;
        let reply = reply_rx.await.map_err(|_| Error::closed())??;
        let server = decode_body::<TypedReply<HelloReply>>(&reply)?.body;
        Ok(Client { shared: Arc::new(Shared { addr, next_id: AtomicU64::new(1), outgoing: tx, pending, server }) })
    }

    /// The `HOST:PORT` this connection went to (with several addresses, the one that answered).
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// What the daemon said in its hello reply.
    pub fn server(&self) -> &HelloReply {
        &self.shared.server
    }

    /// Sends any op with any body and returns the reply body as a [`Value`].
    pub async fn call_raw<B: Serialize>(&self, op_name: &str, body: &B) -> Result<Value, Error> {
        let frame = self.send(op_name, body).await?;
        Ok(decode_body::<RawReply>(&frame)?.body)
    }

    /// Sends an op and decodes its reply body as `R`.
    pub async fn call<B: Serialize, R: DeserializeOwned>(&self, op_name: &str, body: &B) -> Result<R, Error> {
        let frame = self.send(op_name, body).await?;
        Ok(decode_body::<TypedReply<R>>(&frame)?.body)
    }

    /// Sends a request and returns its successful reply's frame.
    async fn send<B: Serialize>(&self, op_name: &str, body: &B) -> Result<Bytes, Error> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = proto::encode(&RequestEnvelope { id, op: op_name, body })?;
        // The daemon answers a frame it cannot read with an error that has no request id, which no caller could
        // receive; refuse such frames here, with an error that names the op.
        let max_frame = self.shared.server.max_frame;
        if frame.len() as u64 > max_frame {
            return Err(Error::new(
                ErrorKind::Encode,
                format!("{op_name}: request of {} bytes exceeds the daemon's max_frame of {max_frame}", frame.len()),
            ));
        }
        check_msgpack(&frame, MAX_DEPTH).map_err(|e| Error::new(ErrorKind::Encode, format!("{op_name}: {e}")))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared.outgoing.send(Outgoing { id, frame, reply: reply_tx }).map_err(|_| Error::closed())?;
        reply_rx.await.map_err(|_| Error::closed())?
    }

    /// Enqueues one task; returns its id once the task is durable under the daemon's fsync policy.
    pub async fn enqueue(&self, task: TaskSpec) -> Result<Enqueued, Error> {
        self.call(op::ENQUEUE, &Enqueue { task }).await
    }

    /// Enqueues many tasks with one durable write.
    pub async fn enqueue_batch(&self, tasks: Vec<TaskSpec>) -> Result<Vec<Enqueued>, Error> {
        let reply: EnqueuedBatch = self.call(op::ENQUEUE_BATCH, &EnqueueBatch { tasks }).await?;
        Ok(reply.tasks)
    }

    /// Reads a task's state now. An unknown id is an error of kind `NotFound`.
    pub async fn get(&self, id: &str) -> Result<TaskInfo, Error> {
        self.call(op::GET, &Get { task_id: id.to_string(), wait_ms: 0 }).await
    }

    /// Reads a task, waiting up to `timeout` for it to finish. Returns the task as it is then, finished or not.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TaskInfo, Error> {
        self.call(op::GET, &Get { task_id: id.to_string(), wait_ms: duration_ms(timeout) }).await
    }

    /// Revokes a task; returns the state after the revoke.
    pub async fn revoke(&self, id: &str) -> Result<TaskState, Error> {
        let reply: Revoked = self.call(op::REVOKE, &Revoke { task_id: id.to_string() }).await?;
        Ok(reply.state)
    }

    /// Reads the daemon's counters.
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.call(op::STATS, &StatsRequest {}).await
    }

    /// Deletes the waiting tasks of `queue`; returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u64, Error> {
        let reply: Purged = self.call(op::PURGE, &Purge { queue: queue.to_string() }).await?;
        Ok(reply.purged)
    }

    /// Pauses (`true`) or resumes a queue; returns whether it was paused before.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<bool, Error> {
        let name = if paused { op::PAUSE } else { op::RESUME };
        let reply: PauseState = self.call(name, &QueueName { queue: queue.to_string() }).await?;
        Ok(reply.was_paused)
    }

    /// Sets (or, with neither a rate nor a concurrency, removes) a limit.
    pub async fn set_limit(&self, limit: &SetLimit) -> Result<(), Error> {
        let _: Empty = self.call(op::SET_LIMIT, limit).await?;
        Ok(())
    }

    /// The limits set.
    pub async fn limits(&self) -> Result<Vec<LimitInfo>, Error> {
        let reply: Limits = self.call(op::LIMITS, &Empty {}).await?;
        Ok(reply.limits)
    }

    /// The task events after the request's cursor, waiting up to its `wait_ms` for one (see proto.md, `events`).
    pub async fn events(&self, request: &Events) -> Result<EventList, Error> {
        self.call(op::EVENTS, request).await
    }

    /// The dead set, newest first.
    pub async fn dead_list(&self, queue: Option<&str>, limit: u32) -> Result<Vec<TaskInfo>, Error> {
        let reply: DeadTasks = self.call(op::DEAD_LIST, &DeadList { queue: queue.map(str::to_string), limit }).await?;
        Ok(reply.tasks)
    }

    /// Puts dead tasks back in their queues; returns how many.
    pub async fn dead_requeue(&self, request: DeadRequeue) -> Result<u64, Error> {
        let reply: Requeued = self.call(op::DEAD_REQUEUE, &request).await?;
        Ok(reply.requeued)
    }

    /// Leases up to `request.max` tasks, waiting up to `request.wait_ms` for one.
    pub async fn lease(&self, request: &Lease) -> Result<Vec<LeasedTask>, Error> {
        let reply: Leased = self.call(op::LEASE, request).await?;
        Ok(reply.tasks)
    }

    /// Completes a leased task with its result.
    pub async fn ack(&self, id: &str, lease_id: u64, result: Value) -> Result<(), Error> {
        let _: Empty = self.call(op::ACK, &Ack { task_id: id.to_string(), lease_id, result }).await?;
        Ok(())
    }

    /// Fails a leased task; the reply says whether it will retry.
    pub async fn fail(&self, request: &Fail) -> Result<Failed, Error> {
        self.call(op::FAIL, request).await
    }

    /// Extends a lease (heartbeat). The reply says whether the task was revoked meanwhile.
    pub async fn extend(&self, id: &str, lease_id: u64, lease: Option<Duration>) -> Result<Extended, Error> {
        let request = Extend { task_id: id.to_string(), lease_id, lease_ms: lease.map(duration_ms) };
        self.call(op::EXTEND, &request).await
    }

    /// Reports a running task's progress (Celery's `update_state`): `get` shows it until the next report.
    /// Returns whether the task was revoked (stop it).
    pub async fn progress(&self, id: &str, lease_id: u64, state: &str, meta: Value) -> Result<bool, Error> {
        let request = ProgressRequest { task_id: id.to_string(), lease_id, state: state.to_string(), meta };
        let reply: Extended = self.call(op::PROGRESS, &request).await?;
        Ok(reply.revoked)
    }

    /// Stores a chord: `header` runs in parallel; `callback` runs once after all of them succeeded, with the
    /// array of their results (in header order) as its first argument (unless it is `immutable`).
    pub async fn enqueue_chord(&self, header: Vec<TaskSpec>, callback: TaskSpec) -> Result<EnqueuedChord, Error> {
        self.call(op::ENQUEUE_CHORD, &EnqueueChord { header, callback }).await
    }

    /// Adds a periodic schedule, or changes the one of that name.
    pub async fn schedule_add(&self, schedule: &ScheduleAdd) -> Result<ScheduleInfo, Error> {
        self.call(op::SCHEDULE_ADD, schedule).await
    }

    /// Removes a schedule; returns whether there was one.
    pub async fn schedule_remove(&self, name: &str) -> Result<bool, Error> {
        let reply: ScheduleRemoved = self.call(op::SCHEDULE_REMOVE, &ScheduleName { name: name.to_string() }).await?;
        Ok(reply.removed)
    }

    /// Pauses (`true`) or resumes a schedule.
    pub async fn schedule_set_paused(&self, name: &str, paused: bool) -> Result<ScheduleInfo, Error> {
        let op_name = if paused { op::SCHEDULE_PAUSE } else { op::SCHEDULE_RESUME };
        self.call(op_name, &ScheduleName { name: name.to_string() }).await
    }

    /// Every schedule.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let reply: Schedules = self.call(op::SCHEDULES, &Empty {}).await?;
        Ok(reply.schedules)
    }

    /// Gives a leased task back unrun; its attempt does not count.
    pub async fn release(&self, id: &str, lease_id: u64) -> Result<(), Error> {
        let _: Empty = self.call(op::RELEASE, &Release { task_id: id.to_string(), lease_id }).await?;
        Ok(())
    }

    /// Whether the connection's background task is still running.
    pub fn is_closed(&self) -> bool {
        self.shared.outgoing.is_closed() || lock(&self.shared.pending).closed.is_some()
    }
}

/// Milliseconds in `d`, saturating.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A successful reply, its body as a [`Value`] (nil if absent).
#[derive(serde::Deserialize)]
struct RawReply {
    #[serde(default = "nil")]
    body: Value,
}

fn nil() -> Value {
    Value::Nil
}

/// A successful reply, its body typed.
#[derive(serde::Deserialize)]
#[serde(bound = "R: DeserializeOwned")]
struct TypedReply<R> {
    body: R,
}

/// Decodes a reply frame's body straight from the frame (the envelope keys are ignored).
fn decode_body<R: DeserializeOwned>(frame: &[u8]) -> Result<R, Error> {
    rmp_serde::from_slice(frame).map_err(|e| Error::new(ErrorKind::Protocol, format!("unexpected reply body: {e}")))
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut sink: FramedWrite<W, FrameCodec>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    pending: Pending,
) {
    while let Some(first) = rx.recv().await {
        // Feed everything that is already queued, then flush once: pipelined requests share a syscall.
        let mut next = Some(first);
        while let Some(out) = next.take() {
            {
                let mut state = lock(&pending);
                if let Some(error) = &state.closed {
                    let _ = out.reply.send(Err(error.clone()));
                    next = rx.try_recv().ok();
                    continue;
                }
                state.waiters.insert(out.id, out.reply);
            }
            if let Err(e) = sink.feed(Bytes::from(out.frame)).await {
                fail_all(&pending, Error::new(ErrorKind::Closed, format!("write failed: {e}")));
                return;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = SinkExt::<Bytes>::flush(&mut sink).await {
            fail_all(&pending, Error::new(ErrorKind::Closed, format!("write failed: {e}")));
            return;
        }
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(mut stream: FramedRead<R, FrameCodec>, pending: Pending) {
    loop {
        let frame = match stream.next().await {
            Some(Ok(Frame::Message(bytes))) => bytes,
            Some(Ok(Frame::TooLarge(len))) => {
                // The reply is lost; we cannot know which request it answered, so the connection is unusable.
                fail_all(&pending, Error::new(ErrorKind::Protocol, format!("reply of {len} bytes exceeds max_frame")));
                return;
            }
            Some(Err(e)) => {
                fail_all(&pending, Error::new(ErrorKind::Closed, format!("read failed: {e}")));
                return;
            }
            None => {
                fail_all(&pending, Error::closed());
                return;
            }
        };
        let (id, result) = match parse_reply(&frame) {
            Ok(parsed) => parsed,
            Err(e) => {
                fail_all(&pending, e);
                return;
            }
        };
        let Some(id) = id else {
            // The daemon could not read one of our frames and cannot say which: every waiting call fails rather
            // than one of them waiting forever, and the connection is given up.
            let detail = result.err().map(|e| e.to_string()).unwrap_or_default();
            fail_all(
                &pending,
                Error::new(ErrorKind::Protocol, format!("daemon refused an unreadable request: {detail}")),
            );
            return;
        };
        let waiter = lock(&pending).waiters.remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result.map(|()| frame));
        }
    }
}

/// A reply's envelope, read without its body.
#[derive(serde::Deserialize)]
struct ReplyHead {
    id: Option<u64>,
    ok: Option<bool>,
    error: Option<WireError>,
}

/// Reads a reply frame's request id, and whether it succeeded (its body is decoded later, by the caller).
fn parse_reply(frame: &[u8]) -> Result<(Option<u64>, Result<(), Error>), Error> {
    if !frame.first().is_some_and(|b| matches!(b, 0x80..=0x8f | 0xde | 0xdf)) {
        return Err(Error::new(ErrorKind::Protocol, "reply is not a map"));
    }
    let head: ReplyHead =
        rmp_serde::from_slice(frame).map_err(|e| Error::new(ErrorKind::Protocol, format!("malformed reply: {e}")))?;
    let result = match (head.ok, head.error) {
        (Some(true), _) => Ok(()),
        (_, Some(wire)) => Err(Error::from_wire(wire)),
        _ => Err(Error::new(ErrorKind::Protocol, "reply has neither ok nor error")),
    };
    Ok((head.id, result))
}

fn fail_all(pending: &Pending, error: Error) {
    let waiters: Vec<_> = {
        let mut state = lock(pending);
        state.closed.get_or_insert_with(|| error.clone());
        state.waiters.drain().collect()
    };
    for (_, waiter) in waiters {
        let _ = waiter.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::{split_url, split_url_list, ConnectOptions};

    #[test]
    fn urls_carry_the_token_in_their_password_or_user_part() {
        let cases = [
            ("127.0.0.1:7420", ("127.0.0.1:7420", None)),
            ("tcp://127.0.0.1:7420", ("127.0.0.1:7420", None)),
            ("tcp://:s3cret@host:7420", ("host:7420", Some("s3cret"))),
            ("tcp://s3cret@host:7420/", ("host:7420", Some("s3cret"))),
            ("tcp://user:s3cret@[::1]:7420", ("[::1]:7420", Some("s3cret"))),
            ("tcp://:@host:1", ("host:1", None)),
            ("tls://:s3cret@broker.example:7420", ("broker.example:7420", Some("s3cret"))),
        ];
        for (url, (addr, token)) in cases {
            assert_eq!(split_url(url), (addr.to_string(), token.map(str::to_string)), "{url}");
        }
    }

    #[test]
    fn a_list_of_addresses_shares_one_scheme_and_one_token() {
        let cases: [(&str, &[&str], Option<&str>); 8] = [
            ("a:7420,b:7420", &["a:7420", "b:7420"], None),
            ("tcp://a:7420,b:7420", &["a:7420", "b:7420"], None),
            ("tcp://:s3cret@a:7420,b:7420", &["a:7420", "b:7420"], Some("s3cret")),
            ("tls://:s3cret@a:7420,b:7421,c:7422/", &["a:7420", "b:7421", "c:7422"], Some("s3cret")),
            ("tcp://[::1]:7420,[::2]:7420", &["[::1]:7420", "[::2]:7420"], None),
            // Spaces and empty items (a trailing comma) are ignored.
            (" a:1 , b:2,", &["a:1", "b:2"], None),
            ("127.0.0.1:7420", &["127.0.0.1:7420"], None),
            ("", &[""], None),
        ];
        for (url, addrs, token) in cases {
            let expected = (addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), token.map(str::to_string));
            assert_eq!(split_url_list(url), expected, "{url}");
        }
        let options = ConnectOptions::new("tls://:s3cret@a:7420,b:7420");
        assert_eq!(options.addrs(), ["a:7420", "b:7420"]);
        assert_eq!(options.addr(), "a:7420,b:7420");
        assert!(options.tls);
        assert_eq!(options.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn move_past_makes_the_next_connect_start_after_that_address_in_every_clone() {
        let options = ConnectOptions::new("a:1,b:2,c:3");
        let clone = options.clone();
        let start = |o: &ConnectOptions| o.cursor.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(start(&options), 0);
        options.move_past("b:2");
        assert_eq!(start(&clone), 2);
        clone.move_past("c:3");
        assert_eq!(start(&options), 0, "round-robin: after the last comes the first");
        options.move_past("elsewhere:9");
        assert_eq!(start(&options), 0, "an address not in the list changes nothing");
        let single = ConnectOptions::new("a:1");
        single.move_past("a:1");
        assert_eq!(start(&single), 0);
    }

    #[tokio::test]
    async fn when_every_address_fails_the_error_names_each_one() {
        // Two ports that were just free: nothing listens there.
        let closed = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let (first, second) = (closed(), closed());
        let options = ConnectOptions::new(format!("{first},{second}"));
        let error = options.clone().connect().await.unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Connect);
        let message = error.to_string();
        assert!(message.contains(&format!("connect to {first}:")), "{message}");
        assert!(message.contains(&format!("connect to {second}:")), "{message}");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let options = super::ConnectOptions::new("tcp://:s3cret@host:7420");
        assert!(!format!("{options:?}").contains("s3cret"));
    }
}
