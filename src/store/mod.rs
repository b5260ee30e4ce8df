//! The store: the only code that touches sled, and the owner of every task's state.
//!
//! Each task is one record in the `tasks` tree; the other trees are indexes (see [`keys`]). The queues themselves
//! (what is ready, in which order; what is scheduled for when; who holds which lease until when) are kept in
//! memory and rebuilt from the `active` index at startup, so leasing never scans sled.
//!
//! Crash safety without multi-tree transactions: sled recovers a prefix of its log, so each transition writes
//! its trees in an order where any prefix is either harmless or repaired at startup. An index entry is always
//! written *before* the record that makes it true and removed *after* the record stops making it true, and the
//! record is the truth: a stale index entry (an `active` id whose record is terminal, an `expiry` or `dead` key
//! whose record says otherwise) is ignored and cleaned when found.
//!
//! The store never waits for the disk: callers that reply to a client ask [`Store::durable`] for a flush that
//! covers their write (group commit, see [`flush`]).
//!
//! Time comes from the injected [`Clock`]; the store never reads the wall clock itself.

pub mod flush;
pub mod keys;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use broker_client::proto::{
    DeadRequeue, Enqueued, LeasedTask, QueueStats, TaskError, TaskId, TaskInfo, TaskSpec, TaskState, Totals, Value,
    DEFAULT_QUEUE, MAX_ID_LEN,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::{Config, FsyncPolicy};

/// Identifies a client connection, so its leases can be released when it closes.
pub type ConnId = u64;

/// What went wrong in a store operation. Each variant maps to one wire error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No task has that id.
    #[error("no task with id {0:?}")]
    NotFound(String),
    /// The lease is no longer held.
    #[error("lease {lease_id} on task {id:?} is not held (expired, released, or the task finished)")]
    LeaseLost {
        /// The task.
        id: String,
        /// The lease quoted.
        lease_id: u64,
    },
    /// The task was revoked while leased.
    #[error("task {0:?} was revoked; its outcome was not recorded")]
    Revoked(String),
    /// The request was well-formed but its values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// sled failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record could not be decoded or encoded.
    #[error("corrupt record {id:?}: {message}")]
    Corrupt {
        /// The task.
        id: String,
        /// The codec's complaint.
        message: String,
    },
}

/// The settings the store needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Default lease duration.
    pub default_lease_ms: u64,
    /// Longest lease.
    pub max_lease_ms: u64,
    /// Default result TTL.
    pub result_ttl_ms: u64,
    /// Dead-set TTL.
    pub dead_ttl_ms: u64,
    /// Poison-pill guard.
    pub max_lease_losses: u32,
    /// Flush policy.
    pub fsync: FsyncPolicy,
}

impl From<&Config> for StoreOptions {
    fn from(config: &Config) -> Self {
        StoreOptions {
            default_lease_ms: config.default_lease_ms,
            max_lease_ms: config.max_lease_ms,
            result_ttl_ms: config.result_ttl_secs.saturating_mul(1000),
            dead_ttl_ms: config.dead_ttl_secs.saturating_mul(1000),
            max_lease_losses: config.max_lease_losses,
            fsync: config.fsync,
        }
    }
}

const DEFAULT_MAX_RETRIES: u32 = 3;
const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
const DEFAULT_RETRY_DELAY_MAX_MS: u64 = 3_600_000;
/// How many expired results one tick removes at most, so a tick never stalls the daemon.
const EXPIRY_BATCH: usize = 10_000;

/// A task as stored: the spec with its defaults filled in, plus its life so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskRecord {
    id: TaskId,
    queue: String,
    task: String,
    args: Vec<Value>,
    kwargs: BTreeMap<String, Value>,
    context: BTreeMap<String, Value>,
    priority: i32,
    max_retries: u32,
    retry_delay_ms: u64,
    retry_backoff: bool,
    retry_delay_max_ms: u64,
    lease_ms: u64,
    expires_at_ms: Option<u64>,
    result_ttl_ms: u64,
    state: TaskState,
    attempts: u32,
    lease_losses: u32,
    /// Position in its queue (FIFO within a priority); renewed each time the task becomes ready.
    seq: u64,
    created_at_ms: u64,
    eta_ms: Option<u64>,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    result: Option<Value>,
    error: Option<TaskError>,
    result_expires_at_ms: Option<u64>,
    revoked: bool,
}

impl TaskRecord {
    fn info(self) -> TaskInfo {
        TaskInfo {
            id: self.id,
            queue: self.queue,
            task: self.task,
            state: self.state,
            attempts: self.attempts,
            max_retries: self.max_retries,
            priority: self.priority,
            args: self.args,
            kwargs: self.kwargs,
            context: self.context,
            result: self.result,
            error: self.error,
            created_at_ms: self.created_at_ms,
            eta_ms: self.eta_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            result_expires_at_ms: self.result_expires_at_ms,
            revoked: self.revoked,
        }
    }

    fn ready_key(&self) -> ReadyKey {
        (Reverse(self.priority), self.seq)
    }

    /// The delay before retry number `attempts` (1 after the first failure).
    fn backoff_ms(&self) -> u64 {
        if !self.retry_backoff {
            return self.retry_delay_ms;
        }
        let exponent = self.attempts.saturating_sub(1).min(32);
        self.retry_delay_ms.saturating_mul(1u64 << exponent).min(self.retry_delay_max_ms)
    }
}

/// Order within a queue: higher priority first, then FIFO.
type ReadyKey = (Reverse<i32>, u64);

#[derive(Debug, Default)]
struct QueueIndex {
    ready: BTreeMap<ReadyKey, TaskId>,
    scheduled: u64,
    leased: u64,
    succeeded: u64,
    failed: u64,
    dead: u64,
}

#[derive(Debug, Clone)]
struct LeaseEntry {
    lease_id: u64,
    deadline_ms: u64,
    lease_ms: u64,
    conn: ConnId,
    queue: String,
}

/// The in-memory queues, rebuilt from sled at startup.
#[derive(Debug, Default)]
struct Indexes {
    queues: BTreeMap<String, QueueIndex>,
    /// (due time, id) → queue.
    scheduled: BTreeMap<(u64, TaskId), String>,
    leases: HashMap<TaskId, LeaseEntry>,
    deadlines: BTreeSet<(u64, TaskId)>,
    by_conn: HashMap<ConnId, HashSet<TaskId>>,
    next_seq: u64,
    next_lease_id: u64,
    totals: Totals,
    results_stored: u64,
}

impl Indexes {
    fn queue(&mut self, name: &str) -> &mut QueueIndex {
        if !self.queues.contains_key(name) {
            self.queues.insert(name.to_string(), QueueIndex::default());
        }
        self.queues.get_mut(name).expect("just inserted")
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn remove_lease(&mut self, id: &str) -> Option<LeaseEntry> {
        let entry = self.leases.remove(id)?;
        self.deadlines.remove(&(entry.deadline_ms, id.to_string()));
        if let Some(set) = self.by_conn.get_mut(&entry.conn) {
            set.remove(id);
            if set.is_empty() {
                self.by_conn.remove(&entry.conn);
            }
        }
        decrement(&mut self.queue(&entry.queue).leased);
        Some(entry)
    }
}

/// The outcome of [`Store::fail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailOutcome {
    /// `RETRY` or `FAILURE`.
    pub state: TaskState,
    /// When the retry is due.
    pub retry_at_ms: Option<u64>,
}

/// The store's part of `stats`.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Per-queue counts.
    pub queues: Vec<QueueStats>,
    /// Totals since start.
    pub totals: Totals,
    /// Results stored now.
    pub results_stored: u64,
    /// Leases held per connection.
    pub leases_by_conn: HashMap<ConnId, u64>,
}

/// The broker's state: sled trees plus the in-memory queues.
pub struct Store {
    db: sled::Db,
    tasks: sled::Tree,
    active: sled::Tree,
    expiry: sled::Tree,
    dead: sled::Tree,
    indexes: Mutex<Indexes>,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    id_counter: AtomicU64,
    flusher: flush::Flusher,
    /// Woken whenever a task becomes ready (enqueue, schedule due, retry due, lease lost, requeue).
    ready_notify: Notify,
    /// Woken whenever a task reaches a terminal state.
    finished_notify: Notify,
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir` and rebuilds the queues from it. Tasks that were leased
    /// when the daemon stopped go back to their queues. Must run inside a tokio runtime (the flusher is a task).
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        let mut sled_config = sled::Config::new().path(&config.data_dir).cache_capacity(config.cache_capacity_bytes);
        sled_config = match config.fsync {
            FsyncPolicy::Always => sled_config.flush_every_ms(None),
            FsyncPolicy::Interval => sled_config.flush_every_ms(Some(config.fsync_interval_ms.max(1))),
        };
        let db = sled_config.open()?;
        let store = Store {
            tasks: db.open_tree("tasks")?,
            active: db.open_tree("active")?,
            expiry: db.open_tree("expiry")?,
            dead: db.open_tree("dead")?,
            flusher: flush::Flusher::start(db.clone(), config.fsync),
            db,
            indexes: Mutex::new(Indexes::default()),
            options: StoreOptions::from(config),
            id_counter: AtomicU64::new(initial_counter(clock.now_ms())),
            clock,
            ready_notify: Notify::new(),
            finished_notify: Notify::new(),
        };
        store.recover()?;
        Ok(store)
    }

    /// The current time of the store's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The flush policy in force.
    pub fn fsync_policy(&self) -> FsyncPolicy {
        self.options.fsync
    }

    /// Resolves once everything written before the call is durable under the fsync policy (at once under
    /// `interval`). Concurrent callers share one flush.
    pub fn durable(&self) -> flush::Durable {
        self.flusher.request()
    }

    /// Shutdown: stops the flusher and flushes everything. The database closes when the last handle drops.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.flusher.stop().await;
        self.flush_now().await
    }

    /// Flushes everything now and waits for it.
    pub async fn flush_now(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Invalid(format!("flush task failed: {e}")))??;
        Ok(())
    }

    /// Woken when a task becomes ready.
    pub fn ready_notify(&self) -> &Notify {
        &self.ready_notify
    }

    /// Woken when a task finishes.
    pub fn finished_notify(&self) -> &Notify {
        &self.finished_notify
    }

    fn lock(&self) -> MutexGuard<'_, Indexes> {
        self.indexes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        match self.tasks.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => rmp_serde::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() }),
        }
    }

    fn save(&self, record: &TaskRecord) -> Result<(), StoreError> {
        let bytes = rmp_serde::to_vec_named(record)
            .map_err(|e| StoreError::Corrupt { id: record.id.clone(), message: e.to_string() })?;
        self.tasks.insert(record.id.as_bytes(), bytes)?;
        Ok(())
    }

    /// Rebuilds the in-memory queues from the `active` index.
    fn recover(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut records = Vec::new();
        for entry in self.active.iter() {
            let (key, _) = entry?;
            let id = String::from_utf8_lossy(&key).into_owned();
            match self.load(&id)? {
                Some(record) if !record.state.is_terminal() => records.push(record),
                _ => {
                    self.active.remove(&key)?;
                }
            }
        }
        // Keep the queues' FIFO order across the restart: renumber in the old order.
        records.sort_by_key(|r| r.seq);
        let mut requeued = 0;
        for mut record in records {
            record.seq = idx.take_seq();
            if record.state == TaskState::Started {
                // Its worker's connection died with the daemon: the lease is lost, the attempt counted.
                record.state = TaskState::Pending;
                record.started_at_ms = None;
                requeued += 1;
            }
            match record.eta_ms {
                Some(eta) if eta > now && matches!(record.state, TaskState::Scheduled | TaskState::Retry) => {
                    idx.scheduled.insert((eta, record.id.clone()), record.queue.clone());
                    idx.queue(&record.queue).scheduled += 1;
                }
                _ => {
                    if record.state == TaskState::Scheduled {
                        record.state = TaskState::Pending;
                    }
                    let key = record.ready_key();
                    idx.queue(&record.queue).ready.insert(key, record.id.clone());
                }
            }
            self.save(&record)?;
        }
        for entry in self.dead.iter() {
            let (key, _) = entry?;
            if let Some((queue, id)) = keys::parse_dead(&key) {
                match self.load(&id)? {
                    Some(record) if record.state == TaskState::Failure => idx.queue(&queue).dead += 1,
                    _ => {
                        self.dead.remove(&key)?;
                    }
                }
            }
        }
        idx.results_stored = (self.tasks.len() as u64).saturating_sub(self.active.len() as u64);
        idx.next_lease_id = now.saturating_mul(1000);
        tracing::info!(active = self.active.len(), requeued, results = idx.results_stored, "store recovered");
        Ok(())
    }

    fn new_id(&self) -> TaskId {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff;
        format!("{:012x}{:012x}", self.now_ms() & 0xffff_ffff_ffff, n)
    }

    fn validate(&self, spec: &TaskSpec) -> Result<(), StoreError> {
        if let Some(id) = &spec.id {
            validate_name("id", id)?;
        }
        if let Some(queue) = &spec.queue {
            validate_name("queue", queue)?;
        }
        if spec.task.is_empty() {
            return Err(StoreError::Invalid("field `task` must not be empty".into()));
        }
        if spec.countdown_ms.is_some() && spec.eta_ms.is_some() {
            return Err(StoreError::Invalid("give `countdown_ms` or `eta_ms`, not both".into()));
        }
        if spec.expires_at_ms.is_some() && spec.expires_in_ms.is_some() {
            return Err(StoreError::Invalid("give `expires_at_ms` or `expires_in_ms`, not both".into()));
        }
        if spec.lease_ms == Some(0) {
            return Err(StoreError::Invalid("`lease_ms` must be positive".into()));
        }
        Ok(())
    }

    /// Stores new tasks (or finds existing ones by id). All are validated before any is written.
    pub fn enqueue(&self, specs: Vec<TaskSpec>) -> Result<Vec<Enqueued>, StoreError> {
        for (i, spec) in specs.iter().enumerate() {
            self.validate(spec).map_err(|e| match e {
                StoreError::Invalid(m) if specs.len() > 1 => StoreError::Invalid(format!("task {i}: {m}")),
                other => other,
            })?;
        }
        let now = self.now_ms();
        let mut out = Vec::with_capacity(specs.len());
        let mut woke = false;
        let mut idx = self.lock();
        for spec in specs {
            if let Some(id) = &spec.id {
                if let Some(existing) = self.load(id)? {
                    out.push(Enqueued { id: existing.id, created: false, state: existing.state });
                    continue;
                }
            }
            let id = spec.id.unwrap_or_else(|| self.new_id());
            let eta_ms = spec.eta_ms.or(spec.countdown_ms.map(|c| now.saturating_add(c))).filter(|eta| *eta > now);
            let mut record = TaskRecord {
                id: id.clone(),
                queue: spec.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
                task: spec.task,
                args: spec.args,
                kwargs: spec.kwargs,
                context: spec.context,
                priority: spec.priority,
                max_retries: spec.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
                retry_delay_ms: spec.retry_delay_ms.unwrap_or(DEFAULT_RETRY_DELAY_MS),
                retry_backoff: spec.retry_backoff.unwrap_or(true),
                retry_delay_max_ms: spec.retry_delay_max_ms.unwrap_or(DEFAULT_RETRY_DELAY_MAX_MS),
                lease_ms: spec.lease_ms.unwrap_or(self.options.default_lease_ms).min(self.options.max_lease_ms),
                expires_at_ms: spec.expires_at_ms.or(spec.expires_in_ms.map(|e| now.saturating_add(e))),
                result_ttl_ms: spec.result_ttl_ms.unwrap_or(self.options.result_ttl_ms),
                state: if eta_ms.is_some() { TaskState::Scheduled } else { TaskState::Pending },
                attempts: 0,
                lease_losses: 0,
                seq: idx.take_seq(),
                created_at_ms: now,
                eta_ms,
                started_at_ms: None,
                finished_at_ms: None,
                result: None,
                error: None,
                result_expires_at_ms: None,
                revoked: false,
            };
            if record.expires_at_ms.is_some_and(|e| e <= now) {
                // Expired on arrival: keep it findable, never run it.
                self.finish_revoked(&mut idx, &mut record, now, Some(expired_error()))?;
                out.push(Enqueued { id, created: true, state: TaskState::Revoked });
                continue;
            }
            self.active.insert(id.as_bytes(), &[])?;
            self.save(&record)?;
            match eta_ms {
                Some(eta) => {
                    idx.scheduled.insert((eta, id.clone()), record.queue.clone());
                    idx.queue(&record.queue).scheduled += 1;
                }
                None => {
                    idx.queue(&record.queue).ready.insert(record.ready_key(), id.clone());
                    woke = true;
                }
            }
            idx.totals.enqueued += 1;
            out.push(Enqueued { id, created: true, state: record.state });
        }
        drop(idx);
        if woke {
            self.ready_notify.notify_waiters();
        }
        Ok(out)
    }

    /// Leases up to `max` ready tasks from `queues`, in queue order, for connection `conn`.
    pub fn lease(
        &self,
        conn: ConnId,
        queues: &[String],
        max: usize,
        lease_ms: Option<u64>,
    ) -> Result<Vec<LeasedTask>, StoreError> {
        let now = self.now_ms();
        let mut out = Vec::new();
        let mut idx = self.lock();
        for queue in queues {
            while out.len() < max {
                let Some(q) = idx.queues.get_mut(queue.as_str()) else { break };
                let Some((_, id)) = q.ready.pop_first() else { break };
                let Some(mut record) = self.load(&id)? else { continue };
                if record.state.is_terminal() {
                    continue;
                }
                if record.expires_at_ms.is_some_and(|e| e <= now) {
                    self.finish_revoked(&mut idx, &mut record, now, Some(expired_error()))?;
                    continue;
                }
                let lease_ms = lease_ms.unwrap_or(record.lease_ms).clamp(1, self.options.max_lease_ms);
                idx.next_lease_id += 1;
                let lease_id = idx.next_lease_id;
                record.state = TaskState::Started;
                record.attempts += 1;
                record.started_at_ms = Some(now);
                self.save(&record)?;
                let deadline_ms = now.saturating_add(lease_ms);
                idx.leases.insert(
                    id.clone(),
                    LeaseEntry { lease_id, deadline_ms, lease_ms, conn, queue: record.queue.clone() },
                );
                idx.deadlines.insert((deadline_ms, id.clone()));
                idx.by_conn.entry(conn).or_default().insert(id.clone());
                idx.queue(queue).leased += 1;
                out.push(LeasedTask {
                    id,
                    lease_id,
                    queue: record.queue,
                    task: record.task,
                    args: record.args,
                    kwargs: record.kwargs,
                    context: record.context,
                    attempt: record.attempts,
                    max_retries: record.max_retries,
                    deadline_ms,
                    lease_ms,
                });
            }
        }
        Ok(out)
    }

    /// Checks that `lease_id` on `id` is held; returns the task's record.
    fn held(&self, idx: &Indexes, id: &str, lease_id: u64) -> Result<TaskRecord, StoreError> {
        match idx.leases.get(id) {
            Some(entry) if entry.lease_id == lease_id => {
                self.load(id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))
            }
            _ => Err(StoreError::LeaseLost { id: id.to_string(), lease_id }),
        }
    }

    /// Completes a leased task with its result.
    pub fn ack(&self, id: &str, lease_id: u64, result: Value) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut record = self.held(&idx, id, lease_id)?;
        let entry = idx.remove_lease(id).expect("held lease");
        if record.revoked {
            self.finish_revoked(&mut idx, &mut record, now, None)?;
            drop(idx);
            self.finished_notify.notify_waiters();
            return Err(StoreError::Revoked(id.to_string()));
        }
        record.state = TaskState::Success;
        record.result = Some(result);
        record.error = None;
        let ttl = record.result_ttl_ms;
        self.finish(&mut idx, &mut record, now, ttl)?;
        idx.queue(&entry.queue).succeeded += 1;
        idx.totals.succeeded += 1;
        drop(idx);
        self.finished_notify.notify_waiters();
        Ok(())
    }

    /// Fails a leased task: it retries (after `countdown_ms`, or its backoff) while retries are left and `retry`
    /// is true, else it dies.
    pub fn fail(
        &self,
        id: &str,
        lease_id: u64,
        error: TaskError,
        retry: bool,
        countdown_ms: Option<u64>,
    ) -> Result<FailOutcome, StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut record = self.held(&idx, id, lease_id)?;
        let entry = idx.remove_lease(id).expect("held lease");
        if record.revoked {
            self.finish_revoked(&mut idx, &mut record, now, None)?;
            drop(idx);
            self.finished_notify.notify_waiters();
            return Err(StoreError::Revoked(id.to_string()));
        }
        idx.queue(&entry.queue).failed += 1;
        idx.totals.failed += 1;
        record.error = Some(error);
        if retry && record.attempts <= record.max_retries {
            let retry_at = now.saturating_add(countdown_ms.unwrap_or_else(|| record.backoff_ms()));
            record.state = TaskState::Retry;
            self.schedule(&mut idx, &mut record, retry_at, now)?;
            idx.totals.retried += 1;
            drop(idx);
            self.ready_notify.notify_waiters();
            return Ok(FailOutcome { state: TaskState::Retry, retry_at_ms: Some(retry_at) });
        }
        self.bury(&mut idx, &mut record, now)?;
        drop(idx);
        self.finished_notify.notify_waiters();
        Ok(FailOutcome { state: TaskState::Failure, retry_at_ms: None })
    }

    /// Pushes a lease's deadline to now + `lease_ms` (or the lease's own duration). Reports revocation.
    pub fn extend(&self, id: &str, lease_id: u64, lease_ms: Option<u64>) -> Result<(u64, bool), StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let record = self.held(&idx, id, lease_id)?;
        let entry = idx.leases.get_mut(id).expect("held lease");
        let old = entry.deadline_ms;
        let lease_ms = lease_ms.unwrap_or(entry.lease_ms).clamp(1, self.options.max_lease_ms);
        entry.deadline_ms = now.saturating_add(lease_ms);
        entry.lease_ms = lease_ms;
        let new = entry.deadline_ms;
        idx.deadlines.remove(&(old, id.to_string()));
        idx.deadlines.insert((new, id.to_string()));
        Ok((new, record.revoked))
    }

    /// Gives a leased task back unrun; the attempt does not count.
    pub fn release(&self, id: &str, lease_id: u64) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut record = self.held(&idx, id, lease_id)?;
        idx.remove_lease(id);
        record.attempts = record.attempts.saturating_sub(1);
        self.return_to_queue(&mut idx, &mut record, now)?;
        drop(idx);
        self.ready_notify.notify_waiters();
        Ok(())
    }

    /// A lease ended without an outcome (deadline passed, or its connection closed): the task goes back to its
    /// queue, the attempt counted, unless it was revoked or has lost too many leases.
    fn lose_lease(&self, idx: &mut Indexes, id: &str, now: u64, why: &str) -> Result<(), StoreError> {
        if idx.remove_lease(id).is_none() {
            return Ok(());
        }
        let Some(mut record) = self.load(id)? else { return Ok(()) };
        idx.totals.lease_lost += 1;
        record.lease_losses += 1;
        tracing::debug!(task = %id, why, losses = record.lease_losses, "lease lost");
        if record.revoked {
            return self.finish_revoked(idx, &mut record, now, None);
        }
        if record.lease_losses >= self.options.max_lease_losses {
            record.error = Some(TaskError {
                kind: "LeaseLost".into(),
                message: format!("lease lost {} times ({why}); giving up", record.lease_losses),
                traceback: None,
            });
            return self.bury(idx, &mut record, now);
        }
        self.return_to_queue(idx, &mut record, now)
    }

    /// Releases every lease held by a closed connection.
    pub fn release_connection(&self, conn: ConnId) -> Result<usize, StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let ids: Vec<TaskId> = idx.by_conn.get(&conn).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for id in &ids {
            self.lose_lease(&mut idx, id, now, "worker disconnected")?;
        }
        drop(idx);
        if !ids.is_empty() {
            self.ready_notify.notify_waiters();
            self.finished_notify.notify_waiters();
        }
        Ok(ids.len())
    }

    /// Periodic work: due schedules become ready, passed lease deadlines are lost, expired results are removed.
    pub fn tick(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut woke = false;
        while let Some(entry) = idx.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, id), queue) = entry.remove_entry();
            decrement(&mut idx.queue(&queue).scheduled);
            let Some(mut record) = self.load(&id)? else { continue };
            if record.state.is_terminal() {
                continue;
            }
            if record.state == TaskState::Scheduled {
                record.state = TaskState::Pending;
            }
            record.seq = idx.take_seq();
            self.save(&record)?;
            idx.queue(&queue).ready.insert(record.ready_key(), id);
            woke = true;
        }
        while let Some((deadline, id)) = idx.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.lose_lease(&mut idx, &id, now, "lease deadline passed")?;
            woke = true;
        }
        let mut expired = 0;
        for entry in self.expiry.range(..keys::expiry(now.saturating_add(1), "")).take(EXPIRY_BATCH) {
            let (key, _) = entry?;
            if let Some((at, id)) = keys::parse_expiry(&key) {
                if let Some(record) = self.load(&id)? {
                    if record.state.is_terminal() && record.result_expires_at_ms == Some(at) {
                        if record.state == TaskState::Failure {
                            self.dead.remove(keys::dead(&record.queue, record.finished_at_ms.unwrap_or(0), &id))?;
                            decrement(&mut idx.queue(&record.queue).dead);
                        }
                        self.tasks.remove(id.as_bytes())?;
                        idx.results_stored = idx.results_stored.saturating_sub(1);
                        idx.totals.expired_results += 1;
                        expired += 1;
                    }
                }
            }
            self.expiry.remove(key)?;
        }
        drop(idx);
        if expired > 0 {
            tracing::debug!(expired, "results expired");
        }
        if woke {
            self.ready_notify.notify_waiters();
            self.finished_notify.notify_waiters();
        }
        Ok(())
    }

    /// Reads a task.
    pub fn get(&self, id: &str) -> Result<TaskInfo, StoreError> {
        self.load(id)?.map(TaskRecord::info).ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// Revokes a task; returns its state afterwards.
    pub fn revoke(&self, id: &str) -> Result<TaskState, StoreError> {
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut record = self.load(id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        match record.state {
            s if s.is_terminal() => return Ok(s),
            TaskState::Started => {
                record.revoked = true;
                self.save(&record)?;
                return Ok(TaskState::Started);
            }
            _ => {}
        }
        self.unqueue(&mut idx, &record);
        self.finish_revoked(&mut idx, &mut record, now, None)?;
        drop(idx);
        self.finished_notify.notify_waiters();
        Ok(TaskState::Revoked)
    }

    /// Deletes every ready or scheduled task of `queue`.
    pub fn purge(&self, queue: &str) -> Result<u64, StoreError> {
        let mut idx = self.lock();
        let mut ids: Vec<TaskId> = match idx.queues.get_mut(queue) {
            Some(q) => std::mem::take(&mut q.ready).into_values().collect(),
            None => return Ok(0),
        };
        let due: Vec<(u64, TaskId)> =
            idx.scheduled.iter().filter(|(_, q)| q.as_str() == queue).map(|(k, _)| k.clone()).collect();
        for key in due {
            idx.scheduled.remove(&key);
            decrement(&mut idx.queue(queue).scheduled);
            ids.push(key.1);
        }
        for id in &ids {
            self.tasks.remove(id.as_bytes())?;
            self.active.remove(id.as_bytes())?;
        }
        Ok(ids.len() as u64)
    }

    /// Lists dead tasks, oldest failure first.
    pub fn dead_list(&self, queue: Option<&str>, limit: usize) -> Result<Vec<TaskInfo>, StoreError> {
        let iter = match queue {
            Some(q) => self.dead.scan_prefix(keys::dead_prefix(q)),
            None => self.dead.iter(),
        };
        let mut out = Vec::new();
        for entry in iter {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            let Some((_, id)) = keys::parse_dead(&key) else { continue };
            if let Some(record) = self.load(&id)? {
                if record.state == TaskState::Failure {
                    out.push(record.info());
                }
            }
        }
        Ok(out)
    }

    /// Puts dead tasks back in their queues as new tasks.
    pub fn dead_requeue(&self, request: &DeadRequeue) -> Result<u64, StoreError> {
        let mut ids = request.ids.clone();
        if let Some(queue) = &request.queue {
            let iter = if queue == "*" { self.dead.iter() } else { self.dead.scan_prefix(keys::dead_prefix(queue)) };
            for entry in iter {
                let (key, _) = entry?;
                if let Some((_, id)) = keys::parse_dead(&key) {
                    ids.push(id);
                }
            }
        }
        let now = self.now_ms();
        let mut idx = self.lock();
        let mut count = 0;
        for id in ids {
            let Some(mut record) = self.load(&id)? else { continue };
            if record.state != TaskState::Failure {
                continue;
            }
            let dead_key = keys::dead(&record.queue, record.finished_at_ms.unwrap_or(0), &id);
            self.active.insert(id.as_bytes(), &[])?;
            record.attempts = 0;
            record.lease_losses = 0;
            record.error = None;
            record.finished_at_ms = None;
            record.result_expires_at_ms = None;
            record.eta_ms = None;
            self.return_to_queue(&mut idx, &mut record, now)?;
            self.dead.remove(dead_key)?;
            decrement(&mut idx.queue(&record.queue).dead);
            idx.results_stored = idx.results_stored.saturating_sub(1);
            count += 1;
        }
        drop(idx);
        if count > 0 {
            self.ready_notify.notify_waiters();
        }
        Ok(count)
    }

    /// Counts for `stats`.
    pub fn stats(&self) -> StoreStats {
        let idx = self.lock();
        StoreStats {
            queues: idx
                .queues
                .iter()
                .map(|(name, q)| QueueStats {
                    name: name.clone(),
                    ready: q.ready.len() as u64,
                    scheduled: q.scheduled,
                    leased: q.leased,
                    succeeded: q.succeeded,
                    failed: q.failed,
                    dead: q.dead,
                })
                .collect(),
            totals: idx.totals.clone(),
            results_stored: idx.results_stored,
            leases_by_conn: idx.by_conn.iter().map(|(c, s)| (*c, s.len() as u64)).collect(),
        }
    }

    // --- transitions shared by the operations above -------------------------------------------------------

    /// Takes a waiting task out of the ready or scheduled index.
    fn unqueue(&self, idx: &mut Indexes, record: &TaskRecord) {
        if let Some(q) = idx.queues.get_mut(&record.queue) {
            if q.ready.remove(&record.ready_key()).is_some() {
                return;
            }
        }
        if let Some(eta) = record.eta_ms {
            if idx.scheduled.remove(&(eta, record.id.clone())).is_some() {
                decrement(&mut idx.queue(&record.queue).scheduled);
            }
        }
    }

    /// Makes a task ready now, at the back of its priority.
    fn return_to_queue(&self, idx: &mut Indexes, record: &mut TaskRecord, now: u64) -> Result<(), StoreError> {
        if record.state != TaskState::Retry {
            record.state = TaskState::Pending;
        }
        self.schedule(idx, record, now, now)
    }

    /// Queues a task for `at`: ready at once if due, else scheduled.
    fn schedule(&self, idx: &mut Indexes, record: &mut TaskRecord, at: u64, now: u64) -> Result<(), StoreError> {
        record.started_at_ms = None;
        record.seq = idx.take_seq();
        if at > now {
            record.eta_ms = Some(at);
            self.save(record)?;
            idx.scheduled.insert((at, record.id.clone()), record.queue.clone());
            idx.queue(&record.queue).scheduled += 1;
        } else {
            self.save(record)?;
            idx.queue(&record.queue).ready.insert(record.ready_key(), record.id.clone());
        }
        Ok(())
    }

    /// Writes a terminal record: expiry index first, then the record, then the task leaves `active`.
    fn finish(&self, idx: &mut Indexes, record: &mut TaskRecord, now: u64, ttl_ms: u64) -> Result<(), StoreError> {
        let expires = now.saturating_add(ttl_ms);
        record.finished_at_ms = Some(now);
        record.result_expires_at_ms = Some(expires);
        self.expiry.insert(keys::expiry(expires, &record.id), &[])?;
        self.save(record)?;
        self.active.remove(record.id.as_bytes())?;
        idx.results_stored += 1;
        Ok(())
    }

    fn finish_revoked(
        &self,
        idx: &mut Indexes,
        record: &mut TaskRecord,
        now: u64,
        error: Option<TaskError>,
    ) -> Result<(), StoreError> {
        record.state = TaskState::Revoked;
        record.revoked = true;
        if error.is_some() {
            record.error = error;
        }
        idx.totals.revoked += 1;
        let ttl = record.result_ttl_ms;
        self.finish(idx, record, now, ttl)
    }

    /// Moves a task to the dead set (`FAILURE`).
    fn bury(&self, idx: &mut Indexes, record: &mut TaskRecord, now: u64) -> Result<(), StoreError> {
        record.state = TaskState::Failure;
        self.dead.insert(keys::dead(&record.queue, now, &record.id), &[])?;
        let ttl = self.options.dead_ttl_ms.max(record.result_ttl_ms);
        self.finish(idx, record, now, ttl)?;
        idx.queue(&record.queue).dead += 1;
        idx.totals.dead += 1;
        Ok(())
    }
}

fn expired_error() -> TaskError {
    TaskError { kind: "Expired".into(), message: "task expired before it started".into(), traceback: None }
}

/// Checks a task id or queue name: non-empty, at most [`MAX_ID_LEN`] bytes, no NUL.
pub fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > MAX_ID_LEN || name.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "`{what}` must be 1 to {MAX_ID_LEN} bytes with no NUL (got {} bytes)",
            name.len()
        )));
    }
    Ok(())
}

/// A starting point for the id counter that differs between runs and processes.
fn initial_counter(now_ms: u64) -> u64 {
    let mut x = now_ms ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x & 0xffff_ffff) << 16
}

/// Counters never wrap below zero, even if an index and a count ever disagree.
fn decrement(counter: &mut u64) {
    *counter = counter.saturating_sub(1);
}
