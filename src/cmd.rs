//! Request handling: decode → validate → one store call → reply. One short function per op.
//!
//! [`handle`] turns one frame into an [`Outcome`]: either a reply ready now (with the flush ticket it must wait
//! for under `fsync = "always"`), or a future for ops that wait (`lease` and `get` with `wait_ms`), which the
//! connection runs on its own task so later requests are not held up.
//!
//! Nothing here touches sled or the socket. Errors a client caused become error replies with a stable code;
//! nothing a client sends can make this module panic.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_client::codec::{check_msgpack, value_len, MAX_DEPTH};
use broker_client::proto::{self, op, *};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role};
use crate::engine::{Engine, Op, TaskStore};
use crate::store::control::Limit;
use crate::store::flow::Scope;
use crate::store::record::{key_str, map_entries};
use crate::store::schedule::NewSchedule;
use crate::store::{validate_name, validate_queue, ConnId, Grant, NewTask, Payload, StoreError, StoreStats};

/// The most tasks one `dead_list` returns, whatever its `limit`.
pub const MAX_DEAD_LIST: u32 = 1000;

/// What every connection shares: the store, the settings, and who is connected.
pub struct Shared {
    /// The store: the single node's, or a shared one.
    pub engine: Engine,
    /// The daemon's settings.
    pub config: Config,
    /// When the daemon started.
    pub started: Instant,
    /// Open connections, for `stats`.
    pub connections: Mutex<HashMap<ConnId, ConnInfo>>,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// The broker's operations, on whichever store the daemon runs.
    pub fn tasks(&self) -> &dyn TaskStore {
        self.engine.tasks()
    }
}

/// One open connection as `stats` shows it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The name from its hello.
    pub client: String,
    /// Its peer address.
    pub addr: String,
    /// When it connected (Unix ms).
    pub connected_at_ms: u64,
    /// Whether it has leased (is a worker).
    pub leases: bool,
    /// The queues of its last `lease` (for the dashboard).
    pub queues: Vec<String>,
}

/// One connection's protocol state.
#[derive(Clone)]
pub struct Session {
    /// The connection's id.
    pub conn: ConnId,
    /// Whether `hello` succeeded.
    pub greeted: bool,
    /// What the connection may do, from its `hello` token.
    pub role: Role,
    /// It took one of the slots kept for admins beyond `max_connections`.
    pub reserved: bool,
    /// Cancelled when the connection closes: ends its waiting ops.
    pub closing: CancellationToken,
}

impl Session {
    /// A new connection's session.
    pub fn new(conn: ConnId, reserved: bool) -> Session {
        Session { conn, greeted: false, role: Role::Producer, reserved, closing: CancellationToken::new() }
    }
}

/// A reply frame, ready to write.
pub type ReplyFrame = Vec<u8>;

/// What to do with a request.
pub enum Outcome {
    /// Send this reply; if it carries the request's id, only once the changes made so far are durable (the
    /// connection asks for one ticket for every such reply of a socket read).
    Reply(ReplyFrame, Option<u64>),
    /// Run this on its own task; it yields the reply.
    Wait(Pin<Box<dyn Future<Output = ReplyFrame> + Send>>),
}

/// A request that failed, with the code and message to send.
#[derive(Debug)]
pub struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) | StoreError::NoSchedule(_) => ErrorCode::NotFound,
            StoreError::LeaseLost { .. } => ErrorCode::LeaseLost,
            StoreError::Revoked(_) => ErrorCode::Revoked,
            StoreError::Invalid(_) => ErrorCode::BadRequest,
            StoreError::QueueFull { .. } => ErrorCode::QueueFull,
            StoreError::TooLarge(_) => ErrorCode::ResultTooLarge,
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "store unavailable");
                ErrorCode::StoreUnavailable
            }
            StoreError::Storage(_) | StoreError::Corrupt { .. } | StoreError::Flush(_) | StoreError::Shared(_) => {
                tracing::error!(error = %e, "store error");
                ErrorCode::Internal
            }
        };
        Refusal::new(code, e.to_string())
    }
}

/// Encodes an error reply.
pub fn error_frame(id: Option<u64>, code: ErrorCode, message: &str) -> ReplyFrame {
    proto::encode(&ErrEnvelope { id, ok: false, error: ErrBody { code, message } })
        .expect("an error envelope always encodes")
}

fn ok_frame<T: Serialize>(id: u64, body: &T) -> ReplyFrame {
    match proto::encode(&OkEnvelope { id, ok: true, body }) {
        Ok(frame) => frame,
        Err(e) => error_frame(Some(id), ErrorCode::Internal, &format!("cannot encode reply: {e}")),
    }
}

fn reply<T: Serialize>(id: u64, result: Result<T, Refusal>) -> ReplyFrame {
    match result {
        Ok(body) => ok_frame(id, &body),
        Err(refusal) => error_frame(Some(id), refusal.code, &refusal.message),
    }
}

/// A reply that changed state: it waits for a flush covering the change.
fn durable_reply<T: Serialize>(id: u64, result: Result<T, Refusal>) -> Outcome {
    // A refusal with `revoked` changed state too (the task is finished), so it waits like a success; other
    // refusals changed nothing and go out at once.
    let changed = match &result {
        Ok(_) => true,
        Err(refusal) => matches!(refusal.code, ErrorCode::Revoked | ErrorCode::ResultTooLarge),
    };
    Outcome::Reply(reply(id, result), changed.then_some(id))
}

/// Replies to a store call: at once when it is done already (after the flush its change needs, if `durable`),
/// else on its own task once it is (a shared store's statement: durable when it committed).
fn answer<T: Serialize + Send + 'static>(id: u64, op: Result<Op<T>, Refusal>, durable: bool) -> Outcome {
    match op {
        Err(refusal) => Outcome::Reply(reply::<T>(id, Err(refusal)), None),
        Ok(Op::Now(result)) if durable => durable_reply(id, result.map_err(Refusal::from)),
        Ok(Op::Now(result)) => Outcome::Reply(reply(id, result.map_err(Refusal::from)), None),
        // Its effect has its place already (a shared store's call takes it when made: [`TaskStore`]), so the
        // connection's requests take effect in the order sent; the reply waits for the commit.
        Ok(Op::Later(future)) => Outcome::Wait(Box::pin(async move { reply(id, future.await.map_err(Refusal::from)) })),
    }
}

/// Decodes a request's op fields straight from its frame (the envelope keys `id` and `op` are ignored).
fn body<T: DeserializeOwned>(request: &[u8]) -> Result<T, Refusal> {
    rmp_serde::from_slice(request).map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("invalid request: {e}")))
}

/// Why a frame that is not a well-formed request envelope is refused.
fn refuse_envelope(frame: &[u8]) -> ReplyFrame {
    let request: Value = match rmp_serde::from_slice(frame) {
        Ok(value) => value,
        Err(e) => return error_frame(None, ErrorCode::BadFrame, &format!("not valid MessagePack: {e}")),
    };
    let Some(map) = request.as_map() else {
        return error_frame(None, ErrorCode::BadFrame, "a request must be a MessagePack map");
    };
    let Some(id) = proto::map_get(map, "id").and_then(Value::as_u64) else {
        return error_frame(None, ErrorCode::BadRequest, "missing or invalid field `id` (an unsigned integer)");
    };
    if proto::map_get(map, "op").and_then(Value::as_str).is_none() {
        return error_frame(Some(id), ErrorCode::BadRequest, "missing or invalid field `op` (a string)");
    }
    if let Err(message) = check_keys(frame) {
        return error_frame(Some(id), ErrorCode::BadRequest, &message);
    }
    error_frame(Some(id), ErrorCode::BadFrame, "the request envelope could not be read")
}

/// The request map's keys must each be a MessagePack str, each at most once, and `op` a str (proto.md §4): a key
/// or `op` sent as `bin`, or a repeated key, is refused rather than read one way or another.
fn check_keys(frame: &[u8]) -> Result<(), String> {
    let malformed = || "the request is not a well-formed map".to_string();
    let mut rest = frame;
    let count = rmp::decode::read_map_len(&mut rest).map_err(|_| malformed())? as usize;
    // Requests have a handful of keys: compare each with the ones before it, without allocating; a map with
    // more keys (a hostile one can have millions) goes through a hash set, not quadratic comparisons.
    let mut seen: [&str; 24] = [""; 24];
    let mut spill: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for i in 0..count {
        let key_len = value_len(rest, MAX_DEPTH).map_err(|_| malformed())?;
        let (key, after) = rest.split_at(key_len);
        let Some(name) = key_str(key) else { return Err("request keys must be MessagePack str, not bin".into()) };
        let value_len = value_len(after, MAX_DEPTH).map_err(|_| malformed())?;
        let (value, after) = after.split_at(value_len);
        let earlier = if i < seen.len() { &seen[..i] } else { &seen[..] };
        if earlier.contains(&name) || spill.contains(name) {
            return Err(format!("the key `{name}` appears more than once"));
        }
        if name == "op" && key_str(value).is_none() {
            return Err("`op` must be a MessagePack str, not bin".into());
        }
        match seen.get_mut(i) {
            Some(slot) => *slot = name,
            None => {
                spill.insert(name);
            }
        }
        rest = after;
    }
    Ok(())
}

/// A well-formed request's `id` and `op`, read in the one walk that also checks the whole frame (what
/// `check_msgpack` and `check_keys` check): a map with str keys, each once, `op` a str, `id` an unsigned integer,
/// nothing after it. `None` for anything else: the slower path ([`refuse_envelope`]) then says what is wrong.
fn read_envelope(frame: &[u8]) -> Option<(u64, &str)> {
    let mut rest = frame;
    let count = rmp::decode::read_map_len(&mut rest).ok()? as usize;
    // Walked one level down, each key and value is checked as deep as the whole frame would be.
    let depth = MAX_DEPTH - 1;
    let (mut id, mut op) = (None, None);
    // Requests have a handful of keys: each is compared with the ones before it, without allocating; a map with
    // more (a hostile one can have millions) goes through a hash set, not quadratic comparisons.
    let mut seen: [&str; 24] = [""; 24];
    let mut spill: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for i in 0..count {
        let key_len = value_len(rest, depth).ok()?;
        let (key, after) = rest.split_at(key_len);
        let name = key_str(key)?;
        let earlier = if i < seen.len() { &seen[..i] } else { &seen[..] };
        if earlier.contains(&name) || spill.contains(name) {
            return None;
        }
        match seen.get_mut(i) {
            Some(slot) => *slot = name,
            None => {
                spill.insert(name);
            }
        }
        let value_len = value_len(after, depth).ok()?;
        let (value, after) = after.split_at(value_len);
        match name {
            "id" => id = Some(rmp::decode::read_int::<u64, _>(&mut &value[..]).ok()?),
            "op" => op = Some(key_str(value)?),
            _ => {}
        }
        rest = after;
    }
    if !rest.is_empty() {
        return None;
    }
    Some((id?, op?))
}

/// Handles one frame's payload.
pub fn handle(shared: &Arc<Shared>, session: &mut Session, frame: &[u8]) -> Outcome {
    let Some((id, op_name)) = read_envelope(frame) else {
        if let Err(e) = check_msgpack(frame, MAX_DEPTH) {
            let message = format!("not valid MessagePack: {e}");
            return Outcome::Reply(error_frame(None, ErrorCode::BadFrame, &message), None);
        }
        return Outcome::Reply(refuse_envelope(frame), None);
    };
    let request = frame;
    if shared.shutdown.is_cancelled() {
        return Outcome::Reply(error_frame(Some(id), ErrorCode::ShuttingDown, "the daemon is shutting down"), None);
    }
    if !session.greeted && op_name != op::HELLO {
        return Outcome::Reply(
            error_frame(Some(id), ErrorCode::HelloRequired, "the first request on a connection must be `hello`"),
            None,
        );
    }
    if !session.role.allows(op_name) && op::ALL.contains(&op_name) {
        let message = format!("this connection's role ({}) does not allow `{op_name}`", session.role.as_str());
        return Outcome::Reply(error_frame(Some(id), ErrorCode::Forbidden, &message), None);
    }
    match op_name {
        op::HELLO => Outcome::Reply(reply(id, hello(shared, session, request)), None),
        op::ENQUEUE => answer(id, enqueue(shared, request), true),
        op::ENQUEUE_BATCH => answer(id, enqueue_batch(shared, request), true),
        op::ENQUEUE_CHORD => answer(id, enqueue_chord(shared, request), true),
        op::LEASE => lease(shared, session, id, request),
        op::ACK => answer(id, ack(shared, request), true),
        op::FAIL => answer(id, fail(shared, request), true),
        op::EXTEND => answer(id, extend(shared, request), false),
        op::RELEASE => answer(id, release(shared, request), true),
        op::GET => get(shared, session, id, request),
        op::REVOKE => answer(id, revoke(shared, request), true),
        op::STATS => answer(id, stats(shared), false),
        op::PURGE => answer(id, purge(shared, request), true),
        op::DEAD_LIST => answer(id, dead_list(shared, request), false),
        op::DEAD_REQUEUE => answer(id, dead_requeue(shared, request), true),
        op::EVENTS => events(shared, session, id, request),
        op::PAUSE => flow_op(shared, id, request, |shared, request| pause(shared, request, true)),
        op::RESUME => flow_op(shared, id, request, |shared, request| pause(shared, request, false)),
        op::SET_LIMIT => flow_op(shared, id, request, set_limit),
        op::LIMITS => answer(id, Ok(shared.tasks().limits().map(|limits| Limits { limits })), false),
        op::PROGRESS => answer(id, progress(shared, request), false),
        op::SCHEDULE_ADD => flow_op(shared, id, request, schedule_add),
        op::SCHEDULE_REMOVE => flow_op(shared, id, request, schedule_remove),
        op::SCHEDULE_PAUSE => flow_op(shared, id, request, |shared, request| schedule_pause(shared, request, true)),
        op::SCHEDULE_RESUME => flow_op(shared, id, request, |shared, request| schedule_pause(shared, request, false)),
        op::SCHEDULES => answer(id, Ok(shared.tasks().schedules().map(|schedules| Schedules { schedules })), false),
        other => Outcome::Reply(
            error_frame(Some(id), ErrorCode::UnknownOp, &format!("unknown op {other:?}; see proto.md for the list")),
            None,
        ),
    }
}

/// The longest client name `hello` accepts, in bytes.
pub const MAX_CLIENT_NAME: usize = 200;

fn hello(shared: &Shared, session: &mut Session, request: &[u8]) -> Result<HelloReply, Refusal> {
    let hello: Hello = body(request)?;
    if hello.client.len() > MAX_CLIENT_NAME {
        // It is shown by `stats`, whose reply must stay deliverable.
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("`client` is {} bytes; at most {MAX_CLIENT_NAME}", hello.client.len()),
        ));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {} is not supported; this daemon speaks {PROTOCOL_VERSION}", hello.version),
        ));
    }
    let role = if shared.config.tokens.is_empty() {
        Role::Admin
    } else {
        match hello.token.as_deref().and_then(|token| shared.config.role_of(token)) {
            Some(role) => role,
            None => {
                let why = if hello.token.is_some() { "an unknown token" } else { "no token" };
                tracing::warn!(conn = session.conn, client = %hello.client, "hello refused: {why}");
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    format!("{why}: this daemon requires one (tcp://:TOKEN@host:port or BROKER_TOKEN)"),
                ));
            }
        }
    };
    if session.reserved && role != Role::Admin {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            "the daemon is at max_connections; the connections beyond it are kept for admin clients",
        ));
    }
    session.greeted = true;
    session.role = role;
    if let Some(info) = shared.connections.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&session.conn) {
        info.client = hello.client;
    }
    Ok(HelloReply {
        version: PROTOCOL_VERSION,
        server: format!("broker {}", env!("CARGO_PKG_VERSION")),
        max_frame: shared.config.max_frame_bytes as u64,
        role: role.as_str().to_string(),
    })
}

/// `enqueue` as the daemon reads it ([`Enqueue`] on the wire): the task's arguments stay bytes.
#[derive(serde::Deserialize)]
struct EnqueueRequest {
    task: NewTask,
}

/// Why a request serde read has no field `field` finds: serde also takes a field named by a `bin` or an integer.
const NAMED_BY_STR: &str = "invalid request: name every field with a str";

/// The bytes of the value under `key` in `map`, the bytes of one well-formed MessagePack map (a checked frame).
fn field<'a>(map: &'a [u8], key: &str) -> Option<&'a [u8]> {
    map_entries(map)?.ok()?.into_iter().find(|(k, _)| key_str(k) == Some(key)).map(|(_, value)| value)
}

/// Takes each task's arguments from its bytes in the frame (serde skipped them): `specs` is the bytes of the
/// task spec map, or of the array of them, that `tasks` were decoded from.
fn take_payloads(tasks: &mut [NewTask], specs: &[u8], batch: bool) -> Result<(), Refusal> {
    // Worded as the store's own checks of a spec are (proto.md, `enqueue_batch`).
    let numbered = batch && tasks.len() > 1;
    let invalid = |i: usize, message: String| {
        Refusal::new(ErrorCode::BadRequest, if numbered { format!("task {i}: {message}") } else { message })
    };
    let mut rest = specs;
    if batch {
        rmp::decode::read_array_len(&mut rest).map_err(|e| invalid(0, e.to_string()))?;
    }
    for (i, task) in tasks.iter_mut().enumerate() {
        let len = value_len(rest, MAX_DEPTH).map_err(|e| invalid(i, e))?;
        let (spec, after) = rest.split_at(len);
        task.payload = Payload::of_spec(spec).map_err(|e| invalid(i, e))?;
        rest = after;
    }
    Ok(())
}

fn enqueue(shared: &Shared, request: &[u8]) -> Result<Op<Enqueued>, Refusal> {
    let mut decoded: EnqueueRequest = body(request)?;
    let spec = field(request, "task").ok_or_else(|| Refusal::new(ErrorCode::BadRequest, NAMED_BY_STR))?;
    take_payloads(std::slice::from_mut(&mut decoded.task), spec, false)?;
    Ok(shared
        .tasks()
        .enqueue(vec![decoded.task])
        .and_then(|mut done| done.pop().ok_or_else(|| StoreError::Shared("enqueue stored nothing".into()))))
}

/// The task specs of the array under `key` in `frame`, with their arguments as bytes; a spec that does not
/// decode is named by its place (`<key> <i>: `).
fn specs_of(frame: &[u8], key: &str) -> Result<Vec<NewTask>, Refusal> {
    let missing = || Refusal::new(ErrorCode::BadRequest, format!("invalid request: missing field `{key}` (an array)"));
    let specs = field(frame, key).ok_or_else(missing)?;
    let mut rest = specs;
    let count = rmp::decode::read_array_len(&mut rest).map_err(|_| missing())? as usize;
    let mut tasks = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let invalid = |e: String| Refusal::new(ErrorCode::BadRequest, format!("{key} {i}: {e}"));
        let len = value_len(rest, MAX_DEPTH).map_err(invalid)?;
        let (spec, after) = rest.split_at(len);
        let mut task: NewTask = rmp_serde::from_slice(spec).map_err(|e| invalid(format!("invalid request: {e}")))?;
        task.payload = Payload::of_spec(spec).map_err(invalid)?;
        tasks.push(task);
        rest = after;
    }
    Ok(tasks)
}

fn enqueue_chord(shared: &Shared, frame: &[u8]) -> Result<Op<EnqueuedChord>, Refusal> {
    let header = specs_of(frame, "header")?;
    if header.len() > shared.config.max_enqueue_batch {
        let message =
            format!("a header of {} tasks exceeds max_enqueue_batch {}", header.len(), shared.config.max_enqueue_batch);
        return Err(Refusal::new(ErrorCode::BadRequest, message));
    }
    let spec = field(frame, "callback")
        .ok_or_else(|| Refusal::new(ErrorCode::BadRequest, "invalid request: missing field `callback`"))?;
    let invalid = |e: String| Refusal::new(ErrorCode::BadRequest, format!("callback: {e}"));
    let mut callback: NewTask = rmp_serde::from_slice(spec).map_err(|e| invalid(format!("invalid request: {e}")))?;
    callback.payload = Payload::of_spec(spec).map_err(invalid)?;
    Ok(shared.tasks().enqueue_chord(header, callback).map(|(header, callback)| EnqueuedChord { header, callback }))
}

fn enqueue_batch(shared: &Shared, frame: &[u8]) -> Result<Op<EnqueuedBatch>, Refusal> {
    let missing = || Refusal::new(ErrorCode::BadRequest, "invalid request: missing field `tasks` (an array)");
    let specs = field(frame, "tasks").ok_or_else(missing)?;
    let count = rmp::decode::read_array_len(&mut &specs[..]).map_err(|_| missing())? as usize;
    if count > shared.config.max_enqueue_batch {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("batch of {count} tasks exceeds max_enqueue_batch {}", shared.config.max_enqueue_batch),
        ));
    }
    // Spec by spec, so that a spec that does not decode is named like the ones the store refuses.
    let mut rest = specs;
    rmp::decode::read_array_len(&mut rest).map_err(|_| missing())?;
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let len =
            value_len(rest, MAX_DEPTH).map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("task {i}: {e}")))?;
        let (spec, after) = rest.split_at(len);
        let task: NewTask = rmp_serde::from_slice(spec).map_err(|e| {
            let prefix = if count > 1 { format!("task {i}: ") } else { String::new() };
            Refusal::new(ErrorCode::BadRequest, format!("{prefix}invalid request: {e}"))
        })?;
        tasks.push(task);
        rest = after;
    }
    take_payloads(&mut tasks, specs, true)?;
    Ok(shared.tasks().enqueue(tasks).map(|tasks| EnqueuedBatch { tasks }))
}

/// Encodes a `lease` reply ([`Leased`] in an [`OkEnvelope`], as `ok_frame` would) writing each task's arguments
/// as the bytes they were enqueued as.
fn leased_frame(id: u64, tasks: &[Grant]) -> ReplyFrame {
    use rmp::encode::{write_array_len, write_map_len, write_str, write_uint};
    let mut out = Vec::with_capacity(32 + tasks.iter().map(|t| 160 + t.payload.bytes().len()).sum::<usize>());
    // Writing to a Vec cannot fail.
    let o = &mut out;
    ok_envelope_head(o, id);
    let _ = write_map_len(o, 1);
    let _ = write_str(o, "tasks");
    let _ = write_array_len(o, tasks.len() as u32);
    for task in tasks {
        let (args, kwargs, context) = task.payload.parts();
        let _ = write_map_len(o, 11);
        let _ = write_str(o, "id");
        let _ = write_str(o, &task.id);
        let _ = write_str(o, "lease_id");
        let _ = write_uint(o, task.lease_id);
        let _ = write_str(o, "queue");
        let _ = write_str(o, &task.queue);
        let _ = write_str(o, "task");
        let _ = write_str(o, &task.task);
        for (name, bytes) in [("args", args), ("kwargs", kwargs), ("context", context)] {
            let _ = write_str(o, name);
            o.extend_from_slice(bytes);
        }
        for (name, value) in [
            ("attempt", u64::from(task.attempt)),
            ("max_retries", u64::from(task.max_retries)),
            ("deadline_ms", task.deadline_ms),
            ("lease_ms", task.lease_ms),
        ] {
            let _ = write_str(o, name);
            let _ = write_uint(o, value);
        }
    }
    out
}

fn lease(shared: &Arc<Shared>, session: &Session, id: u64, request: &[u8]) -> Outcome {
    let request: Lease = match body(request) {
        Ok(r) => r,
        Err(refusal) => return Outcome::Reply(reply::<Leased>(id, Err(refusal)), None),
    };
    if let Err(refusal) = check_lease(shared, &request) {
        return Outcome::Reply(reply::<Leased>(id, Err(refusal)), None);
    }
    if let Some(info) = shared.connections.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&session.conn) {
        info.leases = true;
        if info.queues != request.queues {
            info.queues.clone_from(&request.queues);
        }
    }
    let conn = session.conn;
    let max = request.max as usize;
    let first = match shared.tasks().lease(conn, &request.queues, max, request.lease_ms) {
        // Tasks go out only once what made them leasable (their enqueue) is durable: a worker never runs a task
        // that a crash could then un-enqueue. Most tasks have waited in their queue past a flush already.
        Op::Now(Ok((first, unflushed))) if request.wait_ms == 0 || !first.is_empty() => {
            return Outcome::Reply(leased_frame(id, &first), unflushed.then_some(id));
        }
        Op::Now(Err(e)) => return Outcome::Reply(reply::<Leased>(id, Err(e.into())), None),
        Op::Now(Ok(_)) => None,
        // A shared store's first look, made already (what it leases must reach the worker): its outcome first.
        Op::Later(first) => Some(first),
    };
    let wait = Duration::from_millis(request.wait_ms.min(shared.config.max_wait_ms));
    let shared = shared.clone();
    let closing = session.closing.clone();
    Outcome::Wait(Box::pin(async move {
        if let Some(first) = first {
            match first.await {
                Ok((tasks, _)) if tasks.is_empty() && request.wait_ms > 0 => {}
                Ok((tasks, _)) => return leased_frame(id, &tasks),
                Err(e) => return reply::<Leased>(id, Err(e.into())),
            }
        }
        let tasks = shared.tasks();
        let leased = wait_for(&shared, tasks.ready_notify(), &closing, wait, || {
            // A connection that began closing takes nothing more: its leases would be lost at once.
            let look = (!closing.is_cancelled() && !shared.shutdown.is_cancelled())
                .then(|| tasks.lease(conn, &request.queues, max, request.lease_ms));
            async move {
                match look?.resolve().await {
                    Ok((tasks, _)) if tasks.is_empty() => None,
                    found => Some(found),
                }
            }
        })
        .await;
        let (tasks, unflushed) = match leased {
            None => return leased_frame(id, &[]),
            Some(Err(e)) => return reply::<Leased>(id, Err(e.into())),
            Some(Ok(found)) => found,
        };
        let frame = leased_frame(id, &tasks);
        let Some(store) = shared.engine.as_local().filter(|_| unflushed) else { return frame };
        match store.durable().wait().await {
            Ok(()) => frame,
            Err(e) => error_frame(Some(id), ErrorCode::Internal, &format!("not durable: {e}")),
        }
    }))
}

/// Runs `attempt` now and again each time `notify` fires, until it gives a value, `wait` passes, the connection
/// begins closing, or the daemon shuts down (then `None`).
async fn wait_for<T, F: Future<Output = Option<T>>>(
    shared: &Shared,
    notify: &tokio::sync::Notify,
    closing: &CancellationToken,
    wait: Duration,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the attempt, so a wake-up between the attempt and the select is not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(value) = attempt().await {
            return Some(value);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = closing.cancelled() => return None,
            _ = shared.shutdown.cancelled() => return None,
        }
    }
}

fn check_lease(shared: &Shared, request: &Lease) -> Result<(), Refusal> {
    if request.queues.is_empty() {
        return Err(Refusal::new(ErrorCode::BadRequest, "`queues` must name at least one queue"));
    }
    for queue in &request.queues {
        validate_queue(queue)?;
    }
    if request.max == 0 || request.max > shared.config.max_lease_batch {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("`max` must be 1 to {} (got {})", shared.config.max_lease_batch, request.max),
        ));
    }
    if request.lease_ms == Some(0) {
        return Err(Refusal::new(ErrorCode::BadRequest, "`lease_ms` must be positive"));
    }
    Ok(())
}

fn ack(shared: &Shared, frame: &[u8]) -> Result<Op<Empty>, Refusal> {
    let request: Ack = body(frame)?;
    if let Err(message) = check_stored_size(shared, frame, "result") {
        // The task ends FAILURE (not retried: it would produce the same result) and the worker is told why.
        let error = TaskError { kind: "ResultTooLarge".into(), message: message.clone(), traceback: None };
        let fail =
            Fail { task_id: request.task_id, lease_id: request.lease_id, error, retry: false, countdown_ms: None };
        let failed = shared.tasks().fail(fail);
        return Ok(failed.and_then(|_| Err(StoreError::TooLarge(message))));
    }
    Ok(shared.tasks().ack(&request.task_id, request.lease_id, request.result).map(|()| Empty {}))
}

/// Refuses a value the worker wants stored with the task (`result`, progress `meta`) larger than
/// `max_result_bytes`, saying why.
fn check_stored_size(shared: &Shared, frame: &[u8], key: &str) -> Result<(), String> {
    let size = field(frame, key).map_or(0, <[u8]>::len);
    let limit = shared.config.max_result_bytes;
    if size > limit {
        return Err(format!("the {key} is {size} bytes; the daemon keeps at most {limit} (max_result_bytes)"));
    }
    Ok(())
}

fn fail(shared: &Shared, request: &[u8]) -> Result<Op<Failed>, Refusal> {
    let request: Fail = body(request)?;
    let outcome = shared.tasks().fail(request);
    Ok(outcome.map(|outcome| Failed { state: outcome.state, retry_at_ms: outcome.retry_at_ms }))
}

fn extend(shared: &Shared, request: &[u8]) -> Result<Op<Extended>, Refusal> {
    let request: Extend = body(request)?;
    if request.lease_ms == Some(0) {
        return Err(Refusal::new(ErrorCode::BadRequest, "`lease_ms` must be positive"));
    }
    let extended = shared.tasks().extend(&request.task_id, request.lease_id, request.lease_ms);
    Ok(extended.map(|(deadline_ms, revoked)| Extended { deadline_ms, revoked }))
}

fn progress(shared: &Shared, frame: &[u8]) -> Result<Op<Extended>, Refusal> {
    let request: ProgressRequest = body(frame)?;
    check_stored_size(shared, frame, "meta").map_err(|message| Refusal::new(ErrorCode::ResultTooLarge, message))?;
    let at_ms = shared.tasks().now_ms();
    let progress = Progress { state: request.state, meta: request.meta, at_ms };
    let revoked = shared.tasks().progress(&request.task_id, request.lease_id, progress);
    Ok(revoked.map(|revoked| Extended { deadline_ms: 0, revoked }))
}

fn release(shared: &Shared, request: &[u8]) -> Result<Op<Empty>, Refusal> {
    let request: Release = body(request)?;
    Ok(shared.tasks().release(&request.task_id, request.lease_id).map(|()| Empty {}))
}

fn get(shared: &Arc<Shared>, session: &Session, id: u64, request: &[u8]) -> Outcome {
    let request: Get = match body(request) {
        Ok(r) => r,
        Err(refusal) => return Outcome::Reply(reply::<TaskInfo>(id, Err(refusal)), None),
    };
    // Found and not finished: the only answer a waiting `get` waits past.
    let running =
        |found: &Result<(TaskState, Vec<u8>), Refusal>| matches!(found, Ok((state, _)) if !state.is_terminal());
    match shared.tasks().get_encoded(&request.task_id) {
        Op::Now(first) => {
            let first = first.map_err(Refusal::from);
            if request.wait_ms == 0 || !running(&first) {
                return Outcome::Reply(info_reply(id, first), None);
            }
        }
        Op::Later(first) if request.wait_ms == 0 => {
            return Outcome::Wait(Box::pin(async move { info_reply(id, first.await.map_err(Refusal::from)) }));
        }
        // A shared store's first look is made again by the waiting loop, after this one.
        Op::Later(_) => {}
    }
    let wait = Duration::from_millis(request.wait_ms.min(shared.config.max_wait_ms));
    let shared = shared.clone();
    let closing = session.closing.clone();
    Outcome::Wait(Box::pin(async move {
        let tasks = shared.tasks();
        let look = || {
            let found = tasks.get_encoded(&request.task_id);
            async move { found.resolve().await.map_err(Refusal::from) }
        };
        let finished = wait_for(&shared, tasks.finished_notify(), &closing, wait, || {
            let found = look();
            async move { Some(found.await).filter(|found| !running(found)) }
        })
        .await;
        // Time up (or closing): the task as it is now.
        let found = match finished {
            Some(found) => found,
            None => look().await,
        };
        info_reply(id, found)
    }))
}

/// A `get` reply around a `TaskInfo` encoded already ([`TaskStore::get_encoded`]): what `reply` would write.
fn info_reply(id: u64, result: Result<(TaskState, Vec<u8>), Refusal>) -> ReplyFrame {
    let body = match result {
        Ok((_, body)) => body,
        Err(refusal) => return error_frame(Some(id), refusal.code, &refusal.message),
    };
    let mut out = Vec::with_capacity(body.len() + 24);
    ok_envelope_head(&mut out, id);
    out.extend_from_slice(&body);
    out
}

/// Writes what [`OkEnvelope`] encodes before its body: `{id, ok: true, body: ` (the body follows).
fn ok_envelope_head(out: &mut Vec<u8>, id: u64) {
    use rmp::encode::{write_bool, write_map_len, write_str, write_uint};
    // Writing to a Vec cannot fail.
    let _ = write_map_len(out, 3);
    let _ = write_str(out, "id");
    let _ = write_uint(out, id);
    let _ = write_str(out, "ok");
    let _ = write_bool(out, true);
    let _ = write_str(out, "body");
}

fn revoke(shared: &Shared, request: &[u8]) -> Result<Op<Revoked>, Refusal> {
    let request: Revoke = body(request)?;
    Ok(shared.tasks().revoke(&request.task_id).map(|state| Revoked { state }))
}

/// The `stats` reply, once the store counted.
fn stats(shared: &Arc<Shared>) -> Result<Op<Stats>, Refusal> {
    let of = shared.clone();
    Ok(shared.tasks().stats().map(move |store| stats_of(&of, store)))
}

/// The `stats` reply from the store's counts: queues, workers, totals.
pub fn stats_of(shared: &Shared, store: StoreStats) -> Stats {
    let connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
    let mut workers: Vec<(ConnId, WorkerInfo)> = connections
        .iter()
        .filter(|(_, info)| info.leases)
        .map(|(conn, info)| {
            let worker = WorkerInfo {
                client: info.client.clone(),
                addr: info.addr.clone(),
                leased: store.leases_by_conn.get(conn).copied().unwrap_or(0),
                connected_at_ms: info.connected_at_ms,
            };
            (*conn, worker)
        })
        .collect();
    // Oldest first; connections opened in the same millisecond in the order they were accepted.
    workers.sort_by_key(|(conn, w)| (w.connected_at_ms, *conn));
    let workers: Vec<WorkerInfo> = workers.into_iter().map(|(_, w)| w).collect();
    Stats {
        server: format!("broker {}", env!("CARGO_PKG_VERSION")),
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        connections: connections.len() as u64,
        workers,
        queues: store.queues,
        totals: store.totals,
        results_stored: store.results_stored,
        fsync: shared.tasks().durability(),
    }
}

fn purge(shared: &Shared, request: &[u8]) -> Result<Op<Purged>, Refusal> {
    let request: Purge = body(request)?;
    validate_queue(&request.queue)?;
    Ok(shared.tasks().purge(&request.queue).map(|purged| Purged { purged }))
}

fn events(shared: &Arc<Shared>, session: &Session, id: u64, request: &[u8]) -> Outcome {
    let request: Events = match body(request) {
        Ok(r) => r,
        Err(refusal) => return Outcome::Reply(reply::<EventList>(id, Err(refusal)), None),
    };
    if let Some(queue) = &request.queue {
        if let Err(e) = validate_name("queue", queue) {
            return Outcome::Reply(reply::<EventList>(id, Err(e.into())), None);
        }
    }
    let max = request.max.clamp(1, MAX_DEAD_LIST) as usize;
    let read = {
        let shared = shared.clone();
        let request = request.clone();
        let wait_ms = request.wait_ms.min(shared.config.max_wait_ms);
        move |after: Option<u64>| {
            let (events, next, missed) = shared.tasks().events(after, max, request.queue.as_deref(), wait_ms);
            let events = events
                .into_iter()
                .map(|e| TaskEvent {
                    seq: e.seq,
                    at_ms: e.at_ms,
                    task_id: e.task_id.to_string(),
                    queue: e.queue,
                    task: e.task,
                    event: e.event.as_str().to_string(),
                })
                .collect();
            EventList { events, next, missed }
        }
    };
    // A shared store's daemon first hears back the events of the changes it answered (read your own writes).
    let settled = shared.tasks().events_settled();
    let first = settled.is_none().then(|| read(request.after));
    if let Some(first) = first.as_ref().filter(|first| request.wait_ms == 0 || !first.events.is_empty()) {
        return Outcome::Reply(reply(id, Ok::<_, Refusal>(first)), None);
    }
    let wait = Duration::from_millis(request.wait_ms.min(shared.config.max_wait_ms));
    let shared = shared.clone();
    let closing = session.closing.clone();
    Outcome::Wait(Box::pin(async move {
        let first = match (first, settled) {
            (Some(first), _) => first,
            (None, settled) => {
                if let Some(settled) = settled {
                    let _ = settled.await;
                }
                let first = read(request.after);
                if request.wait_ms == 0 || !first.events.is_empty() {
                    return reply(id, Ok::<_, Refusal>(first));
                }
                first
            }
        };
        // Wait from where the first look ended, so that nothing between the two is skipped.
        let cursor = Some(first.next);
        let found = wait_for(&shared, shared.tasks().events_notify(), &closing, wait, || {
            std::future::ready(Some(read(cursor)).filter(|list| !list.events.is_empty()))
        })
        .await;
        reply(id, Ok::<_, Refusal>(found.unwrap_or(EventList { events: Vec::new(), next: first.next, missed: 0 })))
    }))
}

/// A pause, limit or schedule change: the single node's rewrites and syncs its control file, so it runs on a
/// blocking thread (the connection's runtime thread never waits for the disk; the reply comes when it is done); a
/// shared store's is a statement.
fn flow_op<T: Serialize + Send + 'static>(
    shared: &Arc<Shared>,
    id: u64,
    request: &[u8],
    op: fn(&Shared, &[u8]) -> Result<Op<T>, Refusal>,
) -> Outcome {
    if shared.engine.as_local().is_none() {
        return answer(id, op(shared, request), false);
    }
    let shared = shared.clone();
    let request = request.to_vec();
    Outcome::Wait(Box::pin(async move {
        match tokio::task::spawn_blocking(move || op(&shared, &request)).await {
            Ok(Ok(changed)) => reply(id, changed.resolve().await.map_err(Refusal::from)),
            Ok(Err(refusal)) => reply::<T>(id, Err(refusal)),
            Err(e) => error_frame(Some(id), ErrorCode::Internal, &format!("the control file write failed: {e}")),
        }
    }))
}

fn pause(shared: &Shared, request: &[u8], paused: bool) -> Result<Op<PauseState>, Refusal> {
    let request: QueueName = body(request)?;
    validate_queue(&request.queue)?;
    let changed = shared.tasks().set_paused(&request.queue, paused);
    Ok(changed.map(move |was_paused| PauseState { queue: request.queue, paused, was_paused }))
}

fn set_limit(shared: &Shared, request: &[u8]) -> Result<Op<Empty>, Refusal> {
    let request: SetLimit = body(request)?;
    let scope = match request.scope.as_str() {
        "task" => Scope::Task,
        "queue" => Scope::Queue,
        other => {
            let message = format!("`scope` must be \"task\" or \"queue\" (got {other:?})");
            return Err(Refusal::new(ErrorCode::BadRequest, message));
        }
    };
    let limit = Limit { rate: request.rate, concurrency: request.concurrency };
    Ok(shared.tasks().set_limit(scope, &request.name, limit).map(|()| Empty {}))
}

fn schedule_add(shared: &Shared, frame: &[u8]) -> Result<Op<ScheduleInfo>, Refusal> {
    let request: ScheduleAdd = body(frame)?;
    let new = NewSchedule {
        name: request.name,
        task: request.task,
        cron: request.cron,
        timezone: request.timezone,
        every_ms: request.every_ms,
        catch_up: request.catch_up,
    };
    Ok(shared.tasks().schedule_add(new))
}

fn schedule_remove(shared: &Shared, frame: &[u8]) -> Result<Op<ScheduleRemoved>, Refusal> {
    let request: ScheduleName = body(frame)?;
    Ok(shared.tasks().schedule_remove(&request.name).map(|removed| ScheduleRemoved { removed }))
}

fn schedule_pause(shared: &Shared, frame: &[u8], paused: bool) -> Result<Op<ScheduleInfo>, Refusal> {
    let request: ScheduleName = body(frame)?;
    Ok(shared.tasks().schedule_set_paused(&request.name, paused))
}

fn dead_list(shared: &Shared, request: &[u8]) -> Result<Op<DeadTasks>, Refusal> {
    let request: DeadList = body(request)?;
    if let Some(queue) = &request.queue {
        validate_name("queue", queue)?;
    }
    let limit = request.limit.min(MAX_DEAD_LIST) as usize;
    Ok(shared.tasks().dead_list(request.queue.as_deref(), limit).map(|tasks| DeadTasks { tasks }))
}

fn dead_requeue(shared: &Shared, request: &[u8]) -> Result<Op<Requeued>, Refusal> {
    let request: DeadRequeue = body(request)?;
    for id in &request.ids {
        validate_name("ids", id)?;
    }
    if let Some(queue) = request.queue.as_deref().filter(|q| *q != "*") {
        validate_name("queue", queue)?;
    }
    Ok(shared.tasks().dead_requeue(&request).map(|requeued| Requeued { requeued }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_get_reply_reads_as_the_protocol_type_says() {
        use crate::store::record::TaskRecord;
        let args = vec![Value::from(1), Value::Array(vec![Value::Nil; 5])];
        let kwargs = BTreeMap::from([("k".to_string(), Value::Boolean(true))]);
        let context = BTreeMap::from([("user".to_string(), Value::from(7))]);
        let record = TaskRecord {
            id: "t1".into(),
            queue: "q".into(),
            task: "add".into(),
            payload: Payload::from_values(&args, &kwargs, &context),
            state: TaskState::Success,
            result: Some(Box::new(Value::from("done"))),
            finished_at_ms: Some(5),
            ..TaskRecord::default()
        };
        let frame = info_reply(3, Ok((record.state, record.info_bytes().unwrap())));
        #[derive(serde::Deserialize)]
        struct Reply {
            id: u64,
            ok: bool,
            body: TaskInfo,
        }
        let decoded: Reply = rmp_serde::from_slice(&frame).unwrap();
        assert_eq!((decoded.id, decoded.ok), (3, true));
        assert_eq!(decoded.body, record.info());
        assert_eq!(decoded.body.args, args);
        assert_eq!(frame, ok_frame(3, &record.info()), "the same bytes as the typed encoding");
    }

    #[test]
    fn a_lease_reply_reads_as_the_protocol_type_says() {
        let args = vec![Value::from(1), Value::from("two")];
        let kwargs = BTreeMap::from([("k".to_string(), Value::Boolean(true))]);
        let context = BTreeMap::from([("user".to_string(), Value::from(7))]);
        let grant = Grant {
            id: "t1".into(),
            lease_id: 300,
            queue: "q".into(),
            task: "add".into(),
            payload: Payload::from_values(&args, &kwargs, &context),
            attempt: 2,
            max_retries: 70_000,
            deadline_ms: 1_700_000_000_000,
            lease_ms: 30_000,
        };
        let expected = LeasedTask {
            id: grant.id.clone(),
            lease_id: grant.lease_id,
            queue: grant.queue.clone(),
            task: grant.task.clone(),
            args,
            kwargs,
            context,
            attempt: grant.attempt,
            max_retries: grant.max_retries,
            deadline_ms: grant.deadline_ms,
            lease_ms: grant.lease_ms,
        };
        for tasks in [vec![], vec![grant.clone(), grant]] {
            let n = tasks.len();
            let typed = ok_frame(9, &Leased { tasks: vec![expected.clone(); n] });
            assert_eq!(leased_frame(9, &tasks), typed);
        }
    }
}
