//! The wire protocol's message types: the one definition that both the daemon and every Rust client use.
//!
//! `proto.md` at the repository root is the normative description; this module is its Rust form. A request on
//! the wire is one MessagePack map holding `id` (the client's request id), `op` (the operation name) and the op's
//! own fields side by side. A reply is a map `{id, ok: true, body}` or `{id, ok: false, error: {code, message}}`.
//!
//! Nothing in here does I/O: the framing lives in [`crate::codec`], the connection in [`crate::client`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An arbitrary MessagePack value: task arguments, results and context values are carried as these.
pub use rmpv::Value;

/// The protocol version this crate speaks. `hello` carries it; the daemon refuses versions it does not know.
pub const PROTOCOL_VERSION: u32 = 1;

/// The default address of the daemon.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7420";

/// The default maximum frame size: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The queue used when a task names none.
pub const DEFAULT_QUEUE: &str = "default";

/// A task's id. Clients may choose it (any non-empty string up to [`MAX_ID_LEN`] bytes); otherwise the daemon
/// assigns a unique, time-ordered one.
pub type TaskId = String;

/// The longest task id or queue name accepted, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// Where a task is in its life. Every state after `STARTED` that ends in a result is terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", try_from = "String")]
pub enum TaskState {
    /// Waiting in its queue, ready to be leased.
    #[default]
    Pending,
    /// Waiting for its countdown or eta; not leasable yet.
    Scheduled,
    /// Leased by a worker that is running it.
    Started,
    /// Failed, and waiting (or ready again) for another attempt.
    Retry,
    /// Acked with a result. Terminal.
    Success,
    /// Failed with no retries left, or with a non-retryable error; kept in the dead set. Terminal.
    Failure,
    /// Revoked before it finished, or expired before it started. Terminal.
    Revoked,
}

impl TaskState {
    /// Whether the task will not change state any more (short of an operator's requeue).
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Failure | TaskState::Revoked)
    }

    /// The state's wire name, e.g. `"PENDING"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Scheduled => "SCHEDULED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
        }
    }
}

impl TryFrom<String> for TaskState {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        const ALL: [TaskState; 7] = [
            TaskState::Pending,
            TaskState::Scheduled,
            TaskState::Started,
            TaskState::Retry,
            TaskState::Success,
            TaskState::Failure,
            TaskState::Revoked,
        ];
        ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| format!("unknown task state {name:?}"))
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stable error codes a reply can carry. Clients match on these, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum ErrorCode {
    /// The frame was not valid MessagePack, or not a map.
    BadFrame,
    /// The frame's length prefix exceeded the daemon's maximum; its bytes were skipped.
    FrameTooLarge,
    /// A required field was missing, or a field had the wrong type or an invalid value.
    BadRequest,
    /// The `op` is not one the daemon knows.
    UnknownOp,
    /// The first request on a connection must be `hello`.
    HelloRequired,
    /// `hello` asked for a protocol version the daemon does not speak.
    UnsupportedVersion,
    /// No task has that id (never enqueued, purged, or its result expired).
    NotFound,
    /// The lease named in an ack, fail, extend or release is no longer held (it expired, was released, or the
    /// task already finished). Nothing was recorded.
    LeaseLost,
    /// The task was revoked while it ran; the ack or fail was not recorded and the task stays `REVOKED`.
    Revoked,
    /// The daemon is shutting down and takes no new work on this connection.
    ShuttingDown,
    /// The daemon failed internally (storage error). The request may or may not have taken effect.
    Internal,
    /// `hello` carried no token, or one the daemon does not know, while the daemon has tokens configured.
    Unauthorized,
    /// The connection's role does not allow this op (e.g. `purge` with a `producer` token).
    Forbidden,
    /// The daemon holds as many unfinished large frames as it allows (`max_unfinished_bytes`); this frame was
    /// skipped. Retry it later.
    Busy,
    /// The enqueue would take a queue past `max_queue_length`; nothing of the request was stored.
    QueueFull,
    /// The `ack`'s result is larger than `max_result_bytes`; the task was failed (`ResultTooLarge`) instead.
    ResultTooLarge,
    /// The daemon's shared store (PostgreSQL) cannot be reached, or refused the request; the request may or may
    /// not have taken effect. Retry, on this daemon or another one.
    StoreUnavailable,
    /// The op is not available with this daemon's store (e.g. schedules on the PostgreSQL store). Nothing was
    /// changed.
    Unsupported,
}

impl ErrorCode {
    /// The code's wire name, e.g. `"not_found"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotFound => "not_found",
            ErrorCode::LeaseLost => "lease_lost",
            ErrorCode::Revoked => "revoked",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Busy => "busy",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::ResultTooLarge => "result_too_large",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Unsupported => "unsupported",
        }
    }
}

impl ErrorCode {
    /// Every code, in the order proto.md lists them.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::HelloRequired,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotFound,
        ErrorCode::LeaseLost,
        ErrorCode::Revoked,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::QueueFull,
        ErrorCode::ResultTooLarge,
        ErrorCode::Busy,
        ErrorCode::StoreUnavailable,
        ErrorCode::Unsupported,
    ];

    /// The code for a wire name, or `None` for a name this crate does not know.
    pub fn parse(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl TryFrom<String> for ErrorCode {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        ErrorCode::parse(&name).ok_or_else(|| format!("unknown error code {name:?}"))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` member of a failed reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// The stable code. Unknown codes from a newer daemon decode as an error of their own in the client.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

/// The ops a request can name, as their wire strings. One constant per op keeps the spelling in one place.
pub mod op {
    /// Opens a session; must come first.
    pub const HELLO: &str = "hello";
    /// Stores one task.
    pub const ENQUEUE: &str = "enqueue";
    /// Stores many tasks in one durable write.
    pub const ENQUEUE_BATCH: &str = "enqueue_batch";
    /// Leases up to N ready tasks, waiting for one if asked.
    pub const LEASE: &str = "lease";
    /// Completes a leased task with its result.
    pub const ACK: &str = "ack";
    /// Fails a leased task (it retries or dies).
    pub const FAIL: &str = "fail";
    /// Pushes a lease's deadline out (heartbeat).
    pub const EXTEND: &str = "extend";
    /// Gives a leased task back without running it.
    pub const RELEASE: &str = "release";
    /// Reads a task's state and result, optionally waiting for it to finish.
    pub const GET: &str = "get";
    /// Revokes a task.
    pub const REVOKE: &str = "revoke";
    /// Reads the daemon's counters.
    pub const STATS: &str = "stats";
    /// Deletes the waiting tasks of a queue.
    pub const PURGE: &str = "purge";
    /// Lists failed tasks in the dead set.
    pub const DEAD_LIST: &str = "dead_list";
    /// Puts dead tasks back in their queues.
    pub const DEAD_REQUEUE: &str = "dead_requeue";
    /// Reads the task events that happened after a cursor, waiting for some if asked.
    pub const EVENTS: &str = "events";
    /// Stops leases from taking a queue's tasks (durable).
    pub const PAUSE: &str = "pause";
    /// Lets leases take a paused queue's tasks again.
    pub const RESUME: &str = "resume";
    /// Sets or removes the rate and concurrency limit of a task name or a queue (durable).
    pub const SET_LIMIT: &str = "set_limit";
    /// Lists the limits set, with how many tasks each lets run now.
    pub const LIMITS: &str = "limits";
    /// A running task reports its progress.
    pub const PROGRESS: &str = "progress";
    /// Adds or changes a periodic schedule (durable).
    pub const SCHEDULE_ADD: &str = "schedule_add";
    /// Removes a schedule.
    pub const SCHEDULE_REMOVE: &str = "schedule_remove";
    /// Pauses a schedule.
    pub const SCHEDULE_PAUSE: &str = "schedule_pause";
    /// Resumes a schedule.
    pub const SCHEDULE_RESUME: &str = "schedule_resume";
    /// Lists the schedules.
    pub const SCHEDULES: &str = "schedules";
    /// Stores a chord: members and a callback that runs after them all.
    pub const ENQUEUE_CHORD: &str = "enqueue_chord";

    /// Every op, in the order proto.md lists them.
    pub const ALL: [&str; 26] = [
        HELLO,
        ENQUEUE,
        ENQUEUE_BATCH,
        LEASE,
        ACK,
        FAIL,
        EXTEND,
        RELEASE,
        GET,
        REVOKE,
        STATS,
        PURGE,
        DEAD_LIST,
        DEAD_REQUEUE,
        EVENTS,
        PAUSE,
        RESUME,
        SET_LIMIT,
        LIMITS,
        PROGRESS,
        SCHEDULE_ADD,
        SCHEDULE_REMOVE,
        SCHEDULE_PAUSE,
        SCHEDULE_RESUME,
        SCHEDULES,
        ENQUEUE_CHORD,
    ];
}

// ---------------------------------------------------------------------------------------------------------------
// Requests. Each struct is the op's fields; the envelope (`id`, `op`) is added by the codec layer.
// ---------------------------------------------------------------------------------------------------------------

/// `hello`: the first request on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks; the daemon replies with its own or `unsupported_version`.
    pub version: u32,
    /// A free-form name shown by `broker stat` (e.g. `"web-1"` or `"worker@host"`).
    #[serde(default)]
    pub client: String,
    /// The client's token, when the daemon has tokens configured; its role decides which ops are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The reply to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The protocol version the daemon speaks.
    pub version: u32,
    /// The daemon's name and version, e.g. `"broker 0.1.0"`.
    pub server: String,
    /// The largest frame the daemon accepts, in bytes.
    pub max_frame: u64,
    /// The connection's role: `producer`, `worker` or `admin` (every connection is `admin` on a daemon without
    /// tokens). Absent from daemons older than tokens.
    #[serde(default)]
    pub role: String,
}

/// A task to enqueue: what to run, where, and how it retries. Every field but `task` has a default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The client-chosen id; if absent the daemon assigns one. Enqueuing an id that exists returns that task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<TaskId>,
    /// The queue; `"default"` if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The task's name, which a worker maps to a handler.
    pub task: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: BTreeMap<String, Value>,
    /// Values that travel with the task unchanged (request path, headers, current user...).
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
    /// Higher runs first; FIFO within a priority. Default 0; negative values are allowed.
    #[serde(default)]
    pub priority: i32,
    /// Run no earlier than this many milliseconds from now. Exclusive with `eta_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countdown_ms: Option<u64>,
    /// Run no earlier than this time (Unix milliseconds). Exclusive with `countdown_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// How many times a failed task is retried; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// The delay before the first retry; default 1000 ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_ms: Option<u64>,
    /// Whether the delay doubles on each retry (default true), capped at `retry_delay_max_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<bool>,
    /// The largest retry delay; default one hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_max_ms: Option<u64>,
    /// How long a lease on this task lasts before it returns to the queue; default from the daemon's config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Drop the task (state `REVOKED`) if it has not started by this time (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Like `expires_at_ms`, relative to the enqueue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
    /// How long the result is kept after the task finishes; default from the daemon's config (24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ttl_ms: Option<u64>,
    /// A unique task: while the key is held, enqueueing another task with it returns the task that holds it
    /// (`created: false`) instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// How long the key is held from the enqueue; absent: until the task finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_for_ms: Option<u64>,
    /// The tasks to run after this one, in order (a chain): when it succeeds the daemon enqueues the first, with
    /// this task's result as its first argument, carrying the rest. Links may not have chains of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<TaskSpec>,
    /// As a chain's link or a chord's callback: do not pass the previous result (Celery's `.si()`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immutable: bool,
}

impl TaskSpec {
    /// A task named `task` with no arguments and every default.
    pub fn new(task: impl Into<String>) -> Self {
        TaskSpec { task: task.into(), ..Default::default() }
    }
}

/// `enqueue`: one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enqueue {
    /// The task.
    pub task: TaskSpec,
}

/// The reply to `enqueue`, and one entry of the reply to `enqueue_batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The task's id (assigned or the client's).
    pub id: TaskId,
    /// False when a task with this id already existed and was returned instead.
    pub created: bool,
    /// The task's state now.
    pub state: TaskState,
    /// The ids of its chain's links, in order (given by the client, or made by the daemon), when it was created
    /// with a chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<TaskId>,
}

/// `enqueue_batch`: many tasks, stored with one durable write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueueBatch {
    /// The tasks, in order.
    pub tasks: Vec<TaskSpec>,
}

/// The reply to `enqueue_batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueuedBatch {
    /// One entry per task, in request order.
    pub tasks: Vec<Enqueued>,
}

/// `lease`: take up to `max` ready tasks from `queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// Queues in priority order: tasks are taken from the first queue that has one. Default `["default"]`.
    #[serde(default = "default_queues")]
    pub queues: Vec<String>,
    /// How many tasks at most; default 1.
    #[serde(default = "one")]
    pub max: u32,
    /// How long to wait for a task when none is ready; default 0 (answer at once, possibly with none).
    #[serde(default)]
    pub wait_ms: u64,
    /// Overrides each task's lease duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

fn default_queues() -> Vec<String> {
    vec![DEFAULT_QUEUE.to_string()]
}

fn one() -> u32 {
    1
}

/// One leased task, as a worker receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedTask {
    /// The task's id.
    pub id: TaskId,
    /// Names this lease; ack, fail, extend and release must quote it.
    pub lease_id: u64,
    /// The queue it came from.
    pub queue: String,
    /// The task's name.
    pub task: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: BTreeMap<String, Value>,
    /// The context given at enqueue, unchanged.
    pub context: BTreeMap<String, Value>,
    /// 1 on the first delivery, 2 on the second...
    pub attempt: u32,
    /// The task's retry budget.
    pub max_retries: u32,
    /// When the lease ends unless extended (Unix milliseconds, daemon clock).
    pub deadline_ms: u64,
    /// The lease duration; `extend` without `lease_ms` pushes the deadline this far from now.
    pub lease_ms: u64,
}

/// The reply to `lease`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leased {
    /// Between 0 and `max` tasks.
    pub tasks: Vec<LeasedTask>,
}

/// `ack`: the task succeeded with `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The task.
    pub task_id: TaskId,
    /// The lease the worker holds.
    pub lease_id: u64,
    /// The task's return value; nil if absent.
    #[serde(default = "nil")]
    pub result: Value,
}

/// A task's error, as reported by `fail` and shown by `get`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskError {
    /// The error's type name, e.g. `"ValueError"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The error's message.
    pub message: String,
    /// A traceback or backtrace, if the worker had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

/// What a running task last said of its progress (`progress`; Celery's `update_state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// A state name of the task's choosing, e.g. `"PROGRESS"`.
    pub state: String,
    /// Anything (plain data): e.g. `{"current": 30, "total": 100}`.
    #[serde(default = "nil")]
    pub meta: Value,
    /// When it was reported (Unix milliseconds).
    #[serde(default)]
    pub at_ms: u64,
}

/// `fail`: the task raised `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fail {
    /// The task.
    pub task_id: TaskId,
    /// The lease the worker holds.
    pub lease_id: u64,
    /// What went wrong.
    pub error: TaskError,
    /// False: do not retry, whatever the retry budget (bad arguments, unknown task). Default true.
    #[serde(default = "yes")]
    pub retry: bool,
    /// Retry after this delay instead of the task's backoff (like Celery's `self.retry(countdown=...)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countdown_ms: Option<u64>,
}

/// A field that is present decodes to `Some`, even when its value is nil (serde would say `None`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

fn nil() -> Value {
    Value::Nil
}

fn yes() -> bool {
    true
}

/// The reply to `fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// `RETRY` if another attempt is scheduled, `FAILURE` if the task is dead.
    pub state: TaskState,
    /// When the retry becomes ready (Unix milliseconds), for `RETRY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
}

/// `extend`: heartbeat; push the lease's deadline out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extend {
    /// The task.
    pub task_id: TaskId,
    /// The lease the worker holds.
    pub lease_id: u64,
    /// The new deadline is now + this; default the lease's own duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

/// The reply to `extend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extended {
    /// The new deadline (Unix milliseconds).
    pub deadline_ms: u64,
    /// True if the task was revoked: the worker should stop it; its ack will be refused.
    pub revoked: bool,
}

/// `release`: give a leased task back unrun; the attempt does not count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The task.
    pub task_id: TaskId,
    /// The lease the worker holds.
    pub lease_id: u64,
}

/// `get`: read a task, optionally waiting until it is terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Get {
    /// The task.
    pub task_id: TaskId,
    /// Wait up to this long for a terminal state; default 0.
    #[serde(default)]
    pub wait_ms: u64,
}

/// A task as `get` and `dead_list` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task's id.
    pub id: TaskId,
    /// Its queue.
    pub queue: String,
    /// Its name.
    pub task: String,
    /// Its state.
    pub state: TaskState,
    /// How many times it was leased.
    pub attempts: u32,
    /// Its retry budget.
    pub max_retries: u32,
    /// Its priority.
    pub priority: i32,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: BTreeMap<String, Value>,
    /// The context it carries.
    pub context: BTreeMap<String, Value>,
    /// The result, for `SUCCESS` (a nil result is `Some(Value::Nil)`: the key is present with nil).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub result: Option<Value>,
    /// The last error, for `RETRY` and `FAILURE` (and `REVOKED` when it expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// When it was enqueued (Unix milliseconds).
    pub created_at_ms: u64,
    /// When it becomes (or became) ready, for scheduled tasks and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// When its latest attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When it reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// When its result will be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_expires_at_ms: Option<u64>,
    /// True once revoked (a running task stays `STARTED` until its worker acks, fails, releases or loses the
    /// lease; then it is `REVOKED`).
    #[serde(default)]
    pub revoked: bool,
    /// What its worker last reported of its progress (`progress`), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The ids of the links of its chain still to run after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<TaskId>,
    /// For a chord's member: the chord's callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord: Option<TaskId>,
    /// For a chord's callback: its members, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<TaskId>,
}

/// `enqueue_chord`: a group of tasks and a callback that runs once after all of them succeeded, with their
/// results in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueueChord {
    /// The members, run in parallel (at least one; no chains, no unique keys).
    pub header: Vec<TaskSpec>,
    /// The callback: its first argument is the array of the members' results, in header order (unless
    /// `immutable`).
    pub callback: TaskSpec,
}

/// The reply to `enqueue_chord`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueuedChord {
    /// The members, in order.
    pub header: Vec<Enqueued>,
    /// The callback.
    pub callback: Enqueued,
}

/// `progress`: a running task reports how far it got (Celery's `update_state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRequest {
    /// The task.
    pub task_id: TaskId,
    /// The lease the worker holds.
    pub lease_id: u64,
    /// A state name of the task's choosing (1 to 200 bytes), e.g. `"PROGRESS"`.
    pub state: String,
    /// Anything: e.g. `{"current": 30, "total": 100}`.
    #[serde(default = "nil")]
    pub meta: Value,
}

/// `revoke`: never run the task; a running task is flagged for its worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revoke {
    /// The task.
    pub task_id: TaskId,
}

/// The reply to `revoke`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revoked {
    /// The state after the revoke: `REVOKED`, `STARTED` (flagged; the worker learns on extend/ack), or the terminal
    /// state it already had.
    pub state: TaskState,
}

/// `stats`: no fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StatsRequest {}

/// One queue's counts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// The queue's name.
    pub name: String,
    /// Tasks ready to lease now.
    pub ready: u64,
    /// Tasks waiting for a countdown, eta or retry delay.
    pub scheduled: u64,
    /// Tasks leased by workers (in progress).
    pub leased: u64,
    /// Tasks acked since the daemon started.
    pub succeeded: u64,
    /// Failed attempts since the daemon started (each retry counts).
    pub failed: u64,
    /// Tasks in the dead set now.
    pub dead: u64,
    /// Whether the queue is paused (leases take nothing from it). Absent from daemons older than pause.
    #[serde(default)]
    pub paused: bool,
}

/// `schedule_add`: a periodic task kept by the daemon.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ScheduleAdd {
    /// The schedule's name (1 to 150 bytes); adding a name that exists changes that schedule.
    pub name: String,
    /// The task each tick enqueues (no `id`: each tick's is `sched:<name>:<tick ms>`).
    pub task: TaskSpec,
    /// A cron expression: five fields (minute hour day-of-month month day-of-week), or six with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The IANA time zone the cron expression is read in; default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Or: a tick every this many milliseconds (at least 1000), counted from when the schedule was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The ticks that came due while the daemon was down: `"once"` (default) fires the latest, `"skip"` none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
}

/// A schedule as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// The task each tick enqueues.
    pub task: TaskSpec,
    /// Its cron expression, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The cron expression's time zone, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Its period, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// `"once"` or `"skip"`.
    pub catch_up: String,
    /// Whether it is paused.
    pub paused: bool,
    /// When its next tick is due (absent while paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<u64>,
    /// Its latest tick fired and durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<u64>,
}

/// `schedule_remove`, `schedule_pause`, `schedule_resume`: one schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleName {
    /// The schedule.
    pub name: String,
}

/// The reply to `schedule_remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRemoved {
    /// Whether there was such a schedule.
    pub removed: bool,
}

/// The reply to `schedules`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Schedules {
    /// Every schedule, by name.
    pub schedules: Vec<ScheduleInfo>,
}

/// `pause` and `resume`: one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueName {
    /// The queue (it need not have tasks yet).
    pub queue: String,
}

/// The reply to `pause` and `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseState {
    /// The queue.
    pub queue: String,
    /// Whether it is paused now.
    pub paused: bool,
    /// Whether it was paused before the request.
    pub was_paused: bool,
}

/// `set_limit`: the limit on a task name or a queue, for every worker together. Neither `rate` nor
/// `concurrency` removes the limit.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SetLimit {
    /// `"task"` (the tasks of one name, in any queue) or `"queue"` (every task of one queue).
    pub scope: String,
    /// The task name or queue.
    pub name: String,
    /// At most this many starts per second, minute or hour: `"10/s"`, `"100/m"`, `"5/h"` (Celery's syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// At most this many leased at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// One limit as `limits` lists it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LimitInfo {
    /// `"task"` or `"queue"`.
    pub scope: String,
    /// The task name or queue.
    pub name: String,
    /// The rate, as set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// The concurrency, as set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// How many of the tasks it covers are leased now.
    pub running: u32,
}

/// The reply to `limits`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Every limit, task names first, each kind by name.
    pub limits: Vec<LimitInfo>,
}

/// A connected worker (a connection that has leased at least once).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The name it gave in `hello`.
    pub client: String,
    /// Its address.
    pub addr: String,
    /// How many leases it holds now.
    pub leased: u64,
    /// When it connected (Unix milliseconds).
    pub connected_at_ms: u64,
}

/// Counters over the daemon's whole life since it started.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Tasks created by enqueue.
    pub enqueued: u64,
    /// Tasks acked.
    pub succeeded: u64,
    /// Failed attempts (retried or not).
    pub failed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Tasks that reached `FAILURE`.
    pub dead: u64,
    /// Leases that ended without an outcome: deadline passed, worker disconnected, or daemon shutting down.
    pub lease_lost: u64,
    /// Tasks revoked or expired.
    pub revoked: u64,
    /// Results removed after their TTL.
    pub expired_results: u64,
}

/// The reply to `stats`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// The daemon's name and version.
    pub server: String,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Open connections.
    pub connections: u64,
    /// The connections that lease (a subset of `connections`).
    pub workers: Vec<WorkerInfo>,
    /// The queues that have or had tasks since start, sorted by name.
    pub queues: Vec<QueueStats>,
    /// Totals since start.
    pub totals: Totals,
    /// Results currently stored (terminal tasks not yet expired).
    pub results_stored: u64,
    /// The fsync policy in force: `"always"` or `"interval"`.
    pub fsync: String,
}

/// `purge`: delete every waiting (ready or scheduled) task of a queue. Leased tasks are untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Purge {
    /// The queue.
    pub queue: String,
}

/// The reply to `purge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Purged {
    /// How many tasks were deleted.
    pub purged: u64,
}

/// `events`: what happened to tasks after `after`, as `celery events` shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Events {
    /// The cursor: events numbered above it. Absent: from now on (the reply's `next` is the cursor to go on with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// At most this many; default 100, capped at 1000.
    #[serde(default = "hundred")]
    pub max: u32,
    /// If none is there yet, wait up to this long for one (capped by `max_wait_ms`).
    #[serde(default)]
    pub wait_ms: u64,
    /// Only this queue's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// One thing that happened to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Its number; events are numbered in the order they happened.
    pub seq: u64,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// Its queue.
    pub queue: String,
    /// Its name.
    pub task: String,
    /// `enqueued`, `started`, `succeeded`, `failed`, `retried`, `dead`, `revoked`, `expired` or `lease_lost`.
    pub event: String,
}

/// The reply to `events`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EventList {
    /// The events, oldest first.
    pub events: Vec<TaskEvent>,
    /// The cursor for the next `events` request.
    pub next: u64,
    /// Events after `after` that the daemon no longer kept (it keeps the last 10 000).
    pub missed: u64,
}

/// `dead_list`: the failed tasks kept for inspection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadList {
    /// Only this queue's; all queues if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// At most this many; default 100, capped at 1000 by the daemon.
    #[serde(default = "hundred")]
    pub limit: u32,
}

fn hundred() -> u32 {
    100
}

/// The reply to `dead_list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadTasks {
    /// The dead tasks, oldest failure first.
    pub tasks: Vec<TaskInfo>,
}

/// `dead_requeue`: put dead tasks back in their queues as new (`PENDING`, attempts 0).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeadRequeue {
    /// These tasks; ids that are not dead are skipped.
    #[serde(default)]
    pub ids: Vec<TaskId>,
    /// Or every dead task of this queue (`"*"` for all queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// The reply to `dead_requeue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requeued {
    /// How many tasks went back.
    pub requeued: u64,
}

/// An empty reply body (`ack`, `release`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Empty {}

/// A request as sent: the envelope plus the op's fields flattened beside it.
#[derive(Debug, Serialize)]
pub struct RequestEnvelope<'a, T> {
    /// The client's request id, echoed in the reply.
    pub id: u64,
    /// The op name.
    pub op: &'a str,
    /// The op's fields.
    #[serde(flatten)]
    pub body: &'a T,
}

/// A successful reply as sent.
#[derive(Debug, Serialize)]
pub struct OkEnvelope<'a, T> {
    /// The request id it answers.
    pub id: u64,
    /// Always true.
    pub ok: bool,
    /// The op's reply.
    pub body: &'a T,
}

/// A failed reply as sent.
#[derive(Debug, Serialize)]
pub struct ErrEnvelope<'a> {
    /// The request id it answers; nil when the request could not be read far enough to know it.
    pub id: Option<u64>,
    /// Always false.
    pub ok: bool,
    /// What went wrong.
    pub error: ErrBody<'a>,
}

/// The `error` of [`ErrEnvelope`].
#[derive(Debug, Serialize)]
pub struct ErrBody<'a> {
    /// The stable code.
    pub code: ErrorCode,
    /// The message.
    pub message: &'a str,
}

/// Encodes `value` as a MessagePack map (field names included), the form every message on the wire takes.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a [`Value`] (typically a reply `body` or a request with its envelope keys) into a typed message.
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, rmpv::ext::Error> {
    rmpv::ext::from_value(value)
}

/// Looks up a string key in a map value.
pub fn map_get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_envelope_is_a_flat_map() {
        let body = Get { task_id: "t1".into(), wait_ms: 5 };
        let bytes = encode(&RequestEnvelope { id: 9, op: op::GET, body: &body }).unwrap();
        let value: Value = rmp_serde::from_slice(&bytes).unwrap();
        let map = value.as_map().unwrap();
        assert_eq!(map_get(map, "id").and_then(Value::as_u64), Some(9));
        assert_eq!(map_get(map, "op").and_then(Value::as_str), Some("get"));
        assert_eq!(map_get(map, "wait_ms").and_then(Value::as_u64), Some(5));
        let back: Get = from_value(value).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn task_state_wire_names() {
        let bytes = encode(&TaskState::Started).unwrap();
        let v: Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v.as_str(), Some("STARTED"));
        assert_eq!(from_value::<TaskState>(v).unwrap(), TaskState::Started);
        let back: TaskState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, TaskState::Started);
        for code in ErrorCode::ALL {
            assert_eq!(from_value::<ErrorCode>(Value::from(code.as_str())).unwrap(), code);
        }
    }
}
