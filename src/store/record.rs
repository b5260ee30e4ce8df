//! A task as stored: the spec with its defaults filled in, plus its life so far.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use broker_client::proto::{TaskError, TaskId, TaskInfo, TaskState, Value};
use serde::{Deserialize, Serialize};

/// Order within a queue: higher priority first, then FIFO.
pub type ReadyKey = (Reverse<i32>, u64);

/// One task. The `live` and `done` trees hold these as MessagePack arrays in field order (see
/// [`super::disk::ChunkWriter`]): new fields go at the end, with `#[serde(default)]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub queue: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: BTreeMap<String, Value>,
    pub context: BTreeMap<String, Value>,
    pub priority: i32,
    pub max_retries: u32,
    pub retry_delay_ms: u64,
    pub retry_backoff: bool,
    pub retry_delay_max_ms: u64,
    pub lease_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub result_ttl_ms: u64,
    pub state: TaskState,
    /// How many times it was leased.
    pub attempts: u32,
    /// How many of those leases ended without an outcome (deadline passed, worker gone).
    pub lease_losses: u32,
    /// Position in its queue (FIFO within a priority); renewed each time the task becomes ready.
    pub seq: u64,
    pub created_at_ms: u64,
    pub eta_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Boxed (as `error` is): most records in memory are waiting tasks, which have neither, and a box keeps
    /// them 100 bytes smaller. On disk a box is the value itself.
    pub result: Option<Box<Value>>,
    pub error: Option<Box<TaskError>>,
    pub result_expires_at_ms: Option<u64>,
    pub revoked: bool,
}

impl TaskRecord {
    /// The task as `get` shows it.
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            id: self.id.clone(),
            queue: self.queue.clone(),
            task: self.task.clone(),
            state: self.state,
            attempts: self.attempts,
            max_retries: self.max_retries,
            priority: self.priority,
            args: self.args.clone(),
            kwargs: self.kwargs.clone(),
            context: self.context.clone(),
            // A nil result reads back from disk as absent; a succeeded task always shows one.
            result: match (&self.result, self.state) {
                (None, TaskState::Success) => Some(Value::Nil),
                (result, _) => result.as_deref().cloned(),
            },
            error: self.error.as_deref().cloned(),
            created_at_ms: self.created_at_ms,
            eta_ms: self.eta_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            result_expires_at_ms: self.result_expires_at_ms,
            revoked: self.revoked,
        }
    }

    /// Its place in its queue's ready order.
    pub fn ready_key(&self) -> ReadyKey {
        (Reverse(self.priority), self.seq)
    }

    /// The delay before the retry after failed attempt number `attempts`.
    pub fn backoff_ms(&self) -> u64 {
        if !self.retry_backoff {
            return self.retry_delay_ms;
        }
        let exponent = self.attempts.saturating_sub(1).min(32);
        self.retry_delay_ms.saturating_mul(1u64 << exponent).min(self.retry_delay_max_ms)
    }
}
