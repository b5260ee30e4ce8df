//! The store: the owner of every task's state, and (through [`wal`] and [`disk`]) the only code that touches the
//! data directory.
//!
//! Every non-terminal task lives in memory (`live`), with the queues built over it: what is ready and in which
//! order, what is scheduled for when, who holds which lease until when. Finished tasks are known in memory by
//! their state and expiry (`done`); their records are on disk. Operations change only memory and note which tasks
//! they changed (`to_log`); they never wait for the disk. The log writer ([`commit`]) then appends the latest
//! record of every task noted so far to the write-ahead log ([`wal`]) and syncs it (group commit); a reply that
//! must be durable waits for the round that covers its change ([`Store::durable`]). In the background the
//! checkpoint ([`checkpoint`]) writes the same tasks' latest records into a journal in sled ([`disk`]), after
//! which the log segments it covered are deleted. Because each carries only the latest state of each task, a task
//! enqueued, leased and acked within one round costs one log record, and within one checkpoint one sled record.
//!
//! A finished task's record stays in memory (`finished`) until both the log and sled have it; after that `get`
//! reads it from its chunk. At startup the journal is read back, the log replayed over it, and the queues rebuilt;
//! tasks that were leased go back to their queues. A lease itself is never written (it lives in memory), so a
//! task's record on disk says `PENDING` while it runs. Old chunks are removed or compacted as their records stop
//! being current ([`journal`]).
//!
//! Time comes from the injected [`Clock`]; the store never reads the wall clock itself.

pub mod canvas;
pub mod checkpoint;
pub mod commit;
pub mod control;
pub mod disk;
pub mod events;
pub mod flow;
pub mod journal;
pub mod pg;
pub mod record;
pub mod schedule;
pub mod wal;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use broker_client::proto::{
    DeadRequeue, Enqueued, QueueStats, TaskError, TaskId, TaskInfo, TaskSpec, TaskState, Totals, Value, DEFAULT_QUEUE,
    MAX_ID_LEN,
};
use tokio::sync::{watch, Notify};

use crate::clock::Clock;
use crate::config::{Config, FsyncPolicy};
use crate::metrics::{Metrics, Outcome, Took};
use commit::{Durable, Pacing, Progress};
use disk::{Disk, Entry, Loc};
use journal::Journal;
pub use record::Payload;
use record::{ReadyKey, TaskRecord};

/// The hash maps and sets of the store. Keys are task ids, often chosen by clients: foldhash is seeded at random
/// per process (so ids cannot be picked to collide), and several times faster than std's SipHash on short keys.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`Map`].
pub(crate) type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A task's id as the store holds it: one allocation per task, shared by every map and index that names the
/// task (a clone is a reference count, not a copy).
pub type Id = Arc<str>;

/// Identifies a client connection, so its leases can be released when it closes.
pub type ConnId = u64;

/// What went wrong in a store operation. Each variant maps to one wire error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No task has that id.
    #[error("no task with id {0:?}")]
    NotFound(String),
    /// No schedule has that name.
    #[error("no schedule named {0:?}")]
    NoSchedule(String),
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
    /// Enqueuing would take a queue past `max_queue_length`.
    #[error("queue {queue:?} is full: {waiting} tasks waiting, max_queue_length is {limit}")]
    QueueFull {
        /// The queue.
        queue: String,
        /// Tasks waiting in it (ready and scheduled).
        waiting: u64,
        /// The limit.
        limit: u64,
    },
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
    /// A background flush failed or could not run.
    #[error("flush failed: {0}")]
    Flush(String),
    /// A value to keep with the task (a result, a progress meta) is larger than `max_result_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// The shared store (PostgreSQL) cannot be reached or refused the request; it may or may not have taken
    /// effect.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The shared store failed otherwise (a statement it refused for a reason other than its availability).
    #[error("store error: {0}")]
    Shared(String),
}

/// The most links one chain may have: each step copies the rest of the chain into the next link's record.
const MAX_CHAIN: usize = 1000;
/// The most members one chord may have: its callback's record keeps one bit per member.
const MAX_CHORD: usize = 10_000;

pub use events::TaskEvent;

/// A running task as the dashboard shows it: id, task name, started at (Unix ms).
pub type Running = (String, String, u64);

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
    /// Sync period of the log under `interval`; period of the rounds nobody waits for under `always`.
    pub fsync_interval: Duration,
    /// See [`Config::checkpoint_interval_ms`].
    pub checkpoint_interval: Duration,
    /// See [`Config::checkpoint_log_bytes`].
    pub checkpoint_log_bytes: u64,
    /// See [`Config::shrink_min_bytes`].
    pub shrink_min_bytes: u64,
    /// A `lease` or `dead_list` reply stops adding tasks once their arguments reach this many bytes (it always
    /// carries one): the largest request frame, so that any reply is at most about two requests' size.
    pub max_reply_bytes: usize,
    /// See [`Config::max_queue_length`] (0: no limit).
    pub max_queue_length: u64,
}

impl From<&Config> for StoreOptions {
    fn from(config: &Config) -> Self {
        StoreOptions {
            default_lease_ms: config.default_lease_ms.max(1),
            max_lease_ms: config.max_lease_ms.max(1),
            result_ttl_ms: config.result_ttl_secs.saturating_mul(1000),
            dead_ttl_ms: config.dead_ttl_secs.saturating_mul(1000),
            max_lease_losses: config.max_lease_losses.max(1),
            fsync: config.fsync,
            fsync_interval: Duration::from_millis(config.fsync_interval_ms.max(1)),
            checkpoint_interval: Duration::from_millis(config.checkpoint_interval_ms.max(1)),
            checkpoint_log_bytes: config.checkpoint_log_bytes.max(1),
            shrink_min_bytes: config.shrink_min_bytes,
            max_reply_bytes: config.max_frame_bytes,
            max_queue_length: config.max_queue_length,
        }
    }
}

const DEFAULT_MAX_RETRIES: u32 = 3;
const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
const DEFAULT_RETRY_DELAY_MAX_MS: u64 = 3_600_000;

/// A new task's record from its spec, as every store makes it: the spec's settings or their defaults, created
/// now, waiting (`PENDING`), not yet leased, run or finished. The caller sets its state, eta and extras.
pub(crate) fn new_record(spec: &mut NewTask, id: Id, seq: u64, now: u64, options: &StoreOptions) -> TaskRecord {
    TaskRecord {
        id,
        queue: spec.queue.take().unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
        task: std::mem::take(&mut spec.task),
        payload: std::mem::take(&mut spec.payload),
        priority: spec.priority,
        max_retries: spec.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
        retry_delay_ms: spec.retry_delay_ms.unwrap_or(DEFAULT_RETRY_DELAY_MS),
        retry_backoff: spec.retry_backoff.unwrap_or(true),
        retry_delay_max_ms: spec.retry_delay_max_ms.unwrap_or(DEFAULT_RETRY_DELAY_MAX_MS),
        lease_ms: spec.lease_ms.unwrap_or(options.default_lease_ms).min(options.max_lease_ms),
        expires_at_ms: spec.expires_at_ms.or(spec.expires_in_ms.map(|e| now.saturating_add(e))),
        result_ttl_ms: spec.result_ttl_ms.unwrap_or(options.result_ttl_ms),
        state: TaskState::Pending,
        seq,
        created_at_ms: now,
        ..TaskRecord::default()
    }
}
/// How many tasks a write-out handles per hold of the state lock, so requests never wait long for it.
const LOCK_BATCH: usize = 512;
/// How many expired results one tick removes at most, so a tick never stalls the daemon.
const EXPIRY_BATCH: usize = 10_000;

#[derive(Debug, Default)]
struct QueueIndex {
    ready: BTreeMap<ReadyKey, Id>,
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

/// A task to enqueue as the daemon reads it from a request: the fields of [`TaskSpec`] but the arguments, which
/// it keeps as their bytes ([`Payload`]).
#[derive(Debug, Default, serde::Deserialize)]
pub struct NewTask {
    #[serde(default)]
    pub id: Option<TaskId>,
    #[serde(default)]
    pub queue: Option<String>,
    pub task: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub countdown_ms: Option<u64>,
    #[serde(default)]
    pub eta_ms: Option<u64>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub retry_delay_ms: Option<u64>,
    #[serde(default)]
    pub retry_backoff: Option<bool>,
    #[serde(default)]
    pub retry_delay_max_ms: Option<u64>,
    #[serde(default)]
    pub lease_ms: Option<u64>,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub expires_in_ms: Option<u64>,
    #[serde(default)]
    pub result_ttl_ms: Option<u64>,
    #[serde(default)]
    pub unique_key: Option<String>,
    #[serde(default)]
    pub unique_for_ms: Option<u64>,
    #[serde(default)]
    pub chain: Vec<TaskSpec>,
    #[serde(default)]
    pub immutable: bool,
    /// `args`, `kwargs` and `context`: not read by serde (which skips them), but from the request's bytes
    /// ([`Payload::of_spec`]).
    #[serde(skip)]
    pub payload: Payload,
}

impl From<TaskSpec> for NewTask {
    fn from(spec: TaskSpec) -> Self {
        NewTask {
            payload: Payload::from_values(&spec.args, &spec.kwargs, &spec.context),
            id: spec.id,
            queue: spec.queue,
            task: spec.task,
            priority: spec.priority,
            countdown_ms: spec.countdown_ms,
            eta_ms: spec.eta_ms,
            max_retries: spec.max_retries,
            retry_delay_ms: spec.retry_delay_ms,
            retry_backoff: spec.retry_backoff,
            retry_delay_max_ms: spec.retry_delay_max_ms,
            lease_ms: spec.lease_ms,
            expires_at_ms: spec.expires_at_ms,
            expires_in_ms: spec.expires_in_ms,
            result_ttl_ms: spec.result_ttl_ms,
            unique_key: spec.unique_key,
            unique_for_ms: spec.unique_for_ms,
            chain: spec.chain,
            immutable: spec.immutable,
        }
    }
}

/// One leased task: what a `lease` reply says of it ([`LeasedTask`] on the wire, with the arguments written
/// as the bytes they came as).
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: TaskId,
    pub lease_id: u64,
    pub queue: String,
    pub task: String,
    pub payload: Payload,
    pub attempt: u32,
    pub max_retries: u32,
    pub deadline_ms: u64,
    pub lease_ms: u64,
}

/// What to write for a task at the next log round or checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dirty {
    /// Its record (in `live` or `finished`).
    Put,
    /// A tombstone (purged or expired), if a record of it is on disk.
    Delete,
}

/// What memory keeps of a finished task whose result is kept.
#[derive(Debug, Clone)]
struct DoneMeta {
    state: TaskState,
    /// Failed (or revoked) by the task its chain depended on, never run ([`canvas`]).
    by_parent: bool,
    expires_at_ms: u64,
    /// Its queue, if it is in the dead set (`FAILURE`).
    dead_queue: Option<String>,
    finished_at_ms: u64,
}

impl DoneMeta {
    fn of(record: &TaskRecord) -> DoneMeta {
        DoneMeta {
            state: record.state,
            by_parent: record.extra.as_ref().is_some_and(|e| e.failed_by_parent),
            expires_at_ms: record.result_expires_at_ms.unwrap_or(u64::MAX),
            // A task failed by the task it depended on never ran: there is nothing to requeue.
            dead_queue: (record.state == TaskState::Failure
                && !record.extra.as_ref().is_some_and(|e| e.failed_by_parent))
            .then(|| record.queue.clone()),
            finished_at_ms: record.finished_at_ms.unwrap_or(0),
        }
    }
}

/// Everything in memory, behind one lock.
#[derive(Debug, Default)]
struct State {
    /// Every non-terminal task. Shared with a write-out in progress (which encodes outside the lock); a change
    /// to a record the write-out still holds copies it (`Arc::make_mut`).
    live: Map<Id, Arc<TaskRecord>>,
    /// Terminal tasks whose record is not on disk yet, with the generation of their last change.
    finished: Map<Id, (u64, Arc<TaskRecord>)>,
    /// Every finished task whose result is kept, on disk or not yet.
    done: Map<Id, DoneMeta>,
    /// (expire-at, id) of finished tasks; an entry whose task changed since is skipped when due.
    expiry: BTreeSet<(u64, Id)>,
    /// The dead set: per queue, (failed-at, id), oldest first.
    dead: BTreeMap<String, BTreeSet<(u64, Id)>>,
    /// Tasks changed since the log writer's last round took its notes ([`commit`]).
    to_log: Map<Id, Dirty>,
    /// The notes of the log round being written (shared with it, read-only): not durable yet.
    logging: Arc<Map<Id, Dirty>>,
    /// How many rounds the log writer has started; the next one takes `to_log`.
    rounds_taken: u64,
    /// The highest round a ticket waits for.
    wanted: u64,
    /// Under `interval`: the log writer's wake-up, rung when `to_log` stops being empty while it sleeps.
    eager_wake: Option<Arc<Condvar>>,
    /// Whether the log writer sleeps until rung (under `interval`, when no change came in its last look).
    writer_asleep: bool,
    generation: u64,
    queues: BTreeMap<String, QueueIndex>,
    /// (due time, id) → queue.
    scheduled: BTreeMap<(u64, Id), String>,
    leases: Map<Id, LeaseEntry>,
    deadlines: BTreeSet<(u64, Id)>,
    by_conn: Map<ConnId, Set<Id>>,
    next_seq: u64,
    /// Each queue's and task name's metrics (see [`crate::metrics::Series`]).
    metrics: crate::metrics::Series,
    /// The latest millisecond a task id was made in (see `Store::new_id`).
    last_id_ms: u64,
    totals: Totals,
    /// Recent task events for `events`, recorded only until `events_until_ms` (someone asked lately).
    events: events::EventRing,
    /// Paused queues and limits (see [`flow`]).
    flow: flow::Flow,
    /// Unique keys held: key → (task, until when; `None`: until it finishes).
    unique: Map<String, (Id, Option<u64>)>,
    /// (until, key) of the keys held for a time, for the tick to let go.
    unique_expiry: BTreeSet<(u64, String)>,
    /// Chain links not enqueued yet → the task whose chain holds them, so `get` can show them `PENDING`
    /// ([`canvas`]).
    links: Map<Id, Id>,
    /// Chord callbacks whose members all succeeded, to release outside the lock ([`canvas`]).
    chords_ready: Vec<Id>,
    /// A task became ready during the current operation (a chain's next link): waiting leases look again.
    readied: bool,
}

impl State {
    fn queue(&mut self, name: &str) -> &mut QueueIndex {
        if !self.queues.contains_key(name) {
            self.queues.insert(name.to_string(), QueueIndex::default());
        }
        self.queues.get_mut(name).expect("just inserted")
    }

    /// A queue position after every earlier one, in this run and (clock permitting) in earlier runs.
    fn take_seq(&mut self, now_ms: u64) -> u64 {
        self.next_seq = (self.next_seq + 1).max(now_ms.saturating_mul(1024));
        self.next_seq
    }

    fn remove_lease(&mut self, id: &str) -> Option<LeaseEntry> {
        let (id, entry) = self.leases.remove_entry(id)?;
        self.deadlines.remove(&(entry.deadline_ms, id.clone()));
        if let Some(set) = self.by_conn.get_mut(&entry.conn) {
            set.remove(&id);
            if set.is_empty() {
                self.by_conn.remove(&entry.conn);
            }
        }
        decrement(&mut self.queue(&entry.queue).leased);
        if self.flow.limited() {
            if let Some(record) = self.live.get(&id) {
                self.flow.end(&entry.queue, &record.task);
            }
        }
        Some(entry)
    }

    /// Notes what to log for a task.
    fn note(&mut self, id: &Id, kind: Dirty) {
        if self.writer_asleep && self.to_log.is_empty() {
            if let Some(wake) = &self.eager_wake {
                wake.notify_one();
            }
        }
        self.to_log.insert(id.clone(), kind);
    }

    /// Notes that a task's record changed.
    fn touch(&mut self, id: &Id) {
        self.note(id, Dirty::Put);
    }

    /// Moves a task from `live` to `finished` (and `done`, the expiry index and, if it failed, the dead set).
    fn retire(&mut self, record: TaskRecord) {
        self.release_unique(&record);
        self.live.remove(&record.id);
        self.generation += 1;
        self.touch(&record.id);
        let meta = DoneMeta::of(&record);
        self.expiry.insert((meta.expires_at_ms, record.id.clone()));
        self.add_dead(&record.id, &meta);
        self.done.insert(record.id.clone(), meta);
        self.finished.insert(record.id.clone(), (self.generation, Arc::new(record)));
    }

    fn add_dead(&mut self, id: &Id, meta: &DoneMeta) {
        if let Some(queue) = &meta.dead_queue {
            self.dead.entry(queue.clone()).or_default().insert((meta.finished_at_ms, id.clone()));
            self.queue(queue).dead += 1;
        }
    }

    /// Forgets a finished task's result (expired, purged, or requeued): out of `done`, `finished` and the dead
    /// set. Returns what was known of it.
    fn forget_done(&mut self, id: &str) -> Option<DoneMeta> {
        self.finished.remove(id);
        let (id, meta) = self.done.remove_entry(id)?;
        if let Some(queue) = &meta.dead_queue {
            if let Some(set) = self.dead.get_mut(queue) {
                set.remove(&(meta.finished_at_ms, id));
                if set.is_empty() {
                    self.dead.remove(queue);
                }
            }
            decrement(&mut self.queue(queue).dead);
        }
        Some(meta)
    }

    /// Takes a live task's record out of `live` for the caller to place again (or retire).
    fn take_live(&mut self, id: &str) -> Option<TaskRecord> {
        self.live.remove(id).map(|arc| Arc::try_unwrap(arc).unwrap_or_else(|shared| (*shared).clone()))
    }

    /// Holds a task's unique key, if it has one that still holds at `now`.
    fn hold_unique(&mut self, record: &TaskRecord, now: u64) {
        let Some(extra) = &record.extra else { return };
        let Some(key) = &extra.unique_key else { return };
        match extra.unique_until_ms {
            Some(until) if until <= now => {}
            Some(until) => {
                self.unique.insert(key.clone(), (record.id.clone(), Some(until)));
                self.unique_expiry.insert((until, key.clone()));
            }
            None if record.state.is_terminal() => {}
            None => {
                self.unique.insert(key.clone(), (record.id.clone(), None));
            }
        }
    }

    /// Lets go of a finishing (or deleted) task's key if it is held until the task finishes.
    fn release_unique(&mut self, record: &TaskRecord) {
        let Some(key) = record.extra.as_ref().and_then(|e| e.unique_key.as_ref()) else { return };
        if self.unique.get(key).is_some_and(|(id, until)| *id == record.id && until.is_none()) {
            self.unique.remove(key);
        }
    }

    /// The task that holds `key` at `now`, if one does.
    fn unique_holder(&self, key: &str, now: u64) -> Option<(Id, TaskState)> {
        let (id, until) = self.unique.get(key)?;
        let state = self.state_of(id)?;
        let holds = match until {
            Some(until) => *until > now,
            None => !state.is_terminal(),
        };
        holds.then(|| (id.clone(), state))
    }

    /// Notes that `record` carries its chain's links (not enqueued yet).
    fn index_links(&mut self, record: &TaskRecord) {
        for link in record.extra.iter().flat_map(|e| &e.chain).filter_map(|l| l.id.as_deref()) {
            self.links.insert(Id::from(link), record.id.clone());
        }
    }

    /// A chain link not enqueued yet, as `get` shows it: `PENDING`, its spec's arguments (the result of the task
    /// before it not added yet), the time the task carrying it was enqueued.
    fn pending_link(&self, id: &str) -> Option<TaskRecord> {
        let carrier = self.live.get(self.links.get(id)?)?;
        let link = carrier.extra.as_ref()?.chain.iter().find(|l| l.id.as_deref() == Some(id))?;
        Some(TaskRecord {
            id: Id::from(id),
            queue: link.queue.clone().unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
            task: link.task.clone(),
            payload: Payload::from_values(&link.args, &link.kwargs, &link.context),
            priority: link.priority,
            max_retries: link.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            state: TaskState::Pending,
            created_at_ms: carrier.created_at_ms,
            ..TaskRecord::default()
        })
    }

    /// Forgets a task entirely and notes it.
    fn delete(&mut self, id: &Id) {
        if let Some(record) = self.live.get(id).cloned() {
            self.release_unique(&record);
            // Its chain's links will never be enqueued now.
            for link in record.extra.iter().flat_map(|e| &e.chain).filter_map(|l| l.id.as_deref()) {
                self.links.remove(link);
            }
        }
        self.live.remove(id);
        self.forget_done(id);
        self.note(id, Dirty::Delete);
    }

    /// A task's record, if it is in memory.
    fn record(&self, id: &str) -> Option<&TaskRecord> {
        self.live.get(id).or_else(|| self.finished.get(id).map(|(_, r)| r)).map(|r| &**r)
    }

    /// A task's state, if the task exists.
    fn state_of(&self, id: &str) -> Option<TaskState> {
        self.live.get(id).map(|r| r.state).or_else(|| self.done.get(id).map(|m| m.state))
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

/// A noted change taken for a write-out: the task, and its record (with the generation of a finished one) as
/// it was when taken, or `None` for a tombstone.
type Taken = (Id, Option<(Option<u64>, Arc<TaskRecord>)>);

/// What a write-out wrote, to be noted in [`Journal`] once it is in sled.
struct Written {
    chunks: Vec<disk::NewChunk>,
    puts: Vec<(Id, Loc)>,
    tombstones: Vec<Id>,
}

/// The memory and the disk, shared with the log writer and checkpoint threads.
struct Core {
    disk: Disk,
    /// The daemon's metrics (`/metrics`).
    metrics: Arc<Metrics>,
    /// The log's segments.
    wal_dir: PathBuf,
    state: Mutex<State>,
    /// Where each task's record is in sled's journal. Only checkpoints (and recovery) change it, so it has a lock
    /// of its own: requests never wait while it grows. Never held together with `state` (but in recovery,
    /// before any other thread runs).
    journal: Mutex<Journal>,
    /// Tasks logged since the last checkpoint took its notes ([`checkpoint`]); the log writer adds to it.
    to_checkpoint: Mutex<Map<Id, Dirty>>,
    /// Held for a whole checkpoint write-out, so write-outs reach sled in the order they were taken and the
    /// journal account changes under one writer.
    write_lock: Mutex<()>,
    /// Wakes the log writer (paired with `state`).
    log_wake: Arc<Condvar>,
    /// Set when the store closes: the log writer runs a last round and returns.
    stopping: AtomicBool,
    /// The rounds made durable, for tickets.
    progress: watch::Sender<Progress>,
    /// Whether a checkpoint was asked for and has not ended.
    checkpointing: AtomicBool,
    /// Checkpoints completed since the store opened.
    checkpoints: AtomicU64,
    /// When the running checkpoint started (for the watchdog).
    checkpoint_started: Mutex<Option<Instant>>,
    /// The checkpoint thread's requests (segment numbers); `None` once closed.
    checkpoint_requests: Mutex<Option<std::sync::mpsc::Sender<u64>>>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn to_checkpoint(&self) -> MutexGuard<'_, Map<Id, Dirty>> {
        self.to_checkpoint.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the log writer (after its last round) and the checkpoint thread (after its checkpoint), and waits
    /// for `threads` to end.
    fn stop_threads(&self, threads: Vec<std::thread::JoinHandle<()>>) {
        self.stopping.store(true, Ordering::SeqCst);
        {
            let _st = self.lock();
            self.log_wake.notify_all();
        }
        self.checkpoint_requests.lock().unwrap_or_else(|p| p.into_inner()).take();
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a store thread panicked");
            }
        }
    }
}

/// The broker's state: in-memory queues over a durable sled journal.
pub struct Store {
    core: Arc<Core>,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    /// The log writer and checkpoint threads, joined by [`Store::close`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Woken whenever a task becomes ready (enqueue, schedule due, retry due, lease lost, requeue).
    ready_notify: Notify,
    /// Woken when a task event is recorded (`events` waiters).
    events_notify: Notify,
    /// Woken whenever a task reaches a terminal state or disappears.
    finished_notify: Notify,
    /// The durable settings that are not tasks ([`control`]), in `control_path` (the data directory). Held
    /// while one changes and is saved, so changes reach the file in order; never taken under the state lock.
    control: Mutex<control::Control>,
    control_path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir`: reads the journal in sled, replays the log on top,
    /// writes what the log held into sled (a checkpoint) and starts a new log segment, then starts the log writer
    /// and checkpoint threads. Tasks that were leased when the daemon stopped go back to their queues.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        let options = StoreOptions::from(config);
        let (checkpoint_tx, checkpoint_rx) = std::sync::mpsc::channel();
        let core = Arc::new(Core {
            disk: Disk::open(config)?,
            metrics: Arc::new(Metrics::new()),
            wal_dir: config.data_dir.join("wal"),
            state: Mutex::new(State::default()),
            journal: Mutex::new(Journal::default()),
            to_checkpoint: Mutex::new(Map::default()),
            write_lock: Mutex::new(()),
            log_wake: Arc::new(Condvar::new()),
            stopping: AtomicBool::new(false),
            progress: watch::Sender::new(Progress::default()),
            checkpointing: AtomicBool::new(false),
            checkpoints: AtomicU64::new(0),
            checkpoint_started: Mutex::new(None),
            checkpoint_requests: Mutex::new(Some(checkpoint_tx)),
        });
        let store = Store {
            core,
            options,
            clock,
            threads: Mutex::new(Vec::new()),
            ready_notify: Notify::new(),
            events_notify: Notify::new(),
            finished_notify: Notify::new(),
            control: Mutex::new(control::Control::load(&config.data_dir)?),
            control_path: config.data_dir.clone(),
        };
        store.apply_control()?;
        let segment = store.recover()?;
        store.plan_schedules()?;
        store.core.checkpoint(segment)?;
        let wal = wal::Wal::create(&store.core.wal_dir, segment)?;
        wal::prepare(&store.core.wal_dir, segment + 1)?;
        if store.options.fsync == FsyncPolicy::Interval {
            store.lock().eager_wake = Some(store.core.log_wake.clone());
        }
        let pacing = Pacing {
            policy: store.options.fsync,
            interval: store.options.fsync_interval,
            checkpoint_every: store.options.checkpoint_interval,
            checkpoint_bytes: store.options.checkpoint_log_bytes,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| StoreError::Flush(format!("cannot start the {name} thread: {e}")))
        };
        // Each handle is kept as soon as its thread runs, so a failed start still stops it (see `Drop`).
        let core = store.core.clone();
        let writer = spawn("broker-log", Box::new(move || commit::run_log_writer(core, wal, pacing)))?;
        store.threads.lock().unwrap_or_else(|p| p.into_inner()).push(writer);
        let core = store.core.clone();
        let checkpointer =
            spawn("broker-checkpoint", Box::new(move || checkpoint::run_checkpointer(core, checkpoint_rx)))?;
        store.threads.lock().unwrap_or_else(|p| p.into_inner()).push(checkpointer);
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

    /// A ticket that resolves once every change made before the call is durable in the log (at once under
    /// `interval`). Concurrent callers share one log round and one `fdatasync`.
    pub fn durable(&self) -> Durable {
        if self.options.fsync == FsyncPolicy::Interval {
            return Durable::ready();
        }
        Durable::after(self.core.progress.subscribe(), self.durable_round())
    }

    /// The log round that makes every change made so far durable (asked for at once under `always`).
    fn durable_round(&self) -> u64 {
        let mut st = self.lock();
        let mut ring = false;
        let round = if !st.to_log.is_empty() {
            // The next round takes these notes: ask for it (under `interval`, it comes with the next sync).
            let round = st.rounds_taken + 1;
            if self.options.fsync == FsyncPolicy::Always {
                ring = st.wanted < round;
                st.wanted = st.wanted.max(round);
            }
            round
        } else {
            // Everything noted is in a round already started: the last one, or an earlier one. If that round
            // failed, so does this ticket.
            st.rounds_taken
        };
        drop(st);
        // Rung after the lock is released, so the writer does not wake only to wait for it.
        if ring {
            self.core.log_wake.notify_one();
        }
        round
    }

    /// Writes what the log has handed to the checkpoint into sled now, and flushes it, without moving the replay
    /// mark or touching the log (so it is safe at any time). The checkpoint thread does this on its own schedule;
    /// tests use it to put a checkpoint at a chosen point.
    pub fn write_to_sled(&self) -> Result<(), StoreError> {
        self.core.write_out()?;
        self.core.disk.flush()
    }

    /// How many checkpoints have completed since the store opened (the one at opening included).
    pub fn checkpoints(&self) -> u64 {
        self.core.checkpoints.load(Ordering::SeqCst)
    }

    /// How long the running checkpoint has taken, if it has taken longer than [`checkpoint::STUCK_AFTER`].
    pub fn checkpoint_stuck_for(&self) -> Option<Duration> {
        let started = *self.core.checkpoint_started.lock().unwrap_or_else(|p| p.into_inner());
        started.map(|s| s.elapsed()).filter(|d| *d > checkpoint::STUCK_AFTER)
    }

    /// Shutdown: the log writer runs a last round and stops, the checkpoint thread finishes, and a last
    /// checkpoint writes everything to sled and empties the log. The database closes when the last handle drops.
    pub async fn close(&self) -> Result<(), StoreError> {
        let core = self.core.clone();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        tokio::task::spawn_blocking(move || {
            core.stop_threads(threads);
            let last = wal::segments(&core.wal_dir)?.last().map_or(0, |n| n + 1);
            core.checkpoint(last)
        })
        .await
        .map_err(|e| StoreError::Flush(format!("close task failed: {e}")))?
    }

    /// Woken when a task becomes ready.
    pub fn ready_notify(&self) -> &Notify {
        &self.ready_notify
    }

    /// Woken when a task finishes or disappears.
    pub fn finished_notify(&self) -> &Notify {
        &self.finished_notify
    }

    /// Bytes in the journal, and bytes of current records in it.
    pub fn journal_size(&self) -> (u64, u64) {
        self.core.journal().size()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }

    fn control(&self) -> MutexGuard<'_, control::Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the journal back, then the log segments from the checkpoint mark on: the last entry of each task
    /// wins. Rebuilds the queues, the finished tasks' index and the journal's account, and notes what the log
    /// held for the checkpoint that follows. Returns the number the next log segment gets.
    fn recover(&self) -> Result<u64, StoreError> {
        let now = self.now_ms();
        let chunks = self.core.disk.chunks()?;
        let replay_from = self.core.disk.replay_from()?;
        let all_segments = wal::segments(&self.core.wal_dir)?;
        let next_segment = all_segments.last().map_or(replay_from, |n| (n + 1).max(replay_from));
        let segments = all_segments
            .into_iter()
            .filter(|n| *n >= replay_from)
            .map(|n| wal::read(&self.core.wal_dir, n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut latest: Map<&str, (Loc, &[u8])> = Map::default();
        let mut st = self.lock();
        let mut journal = self.core.journal();
        let mut to_checkpoint = self.core.to_checkpoint();
        for (number, bytes) in &chunks {
            let mut tombstones = 0;
            for entry in disk::entries(*number, bytes)? {
                match entry {
                    Entry::Put { id, loc, body } => {
                        latest.insert(id, (loc, body));
                    }
                    Entry::Delete { id } => {
                        latest.remove(id);
                        tombstones += 1;
                    }
                }
            }
            journal.add_chunk(*number, bytes.len() as u64, tombstones);
        }
        // The journal's account is what sled holds; the log's entries then override the records.
        let mut bodies: Map<&str, (bool, &[u8])> = Map::default();
        for (id, (loc, body)) in latest {
            journal.set(&Id::from(id), loc);
            bodies.insert(id, (false, body));
        }
        let mut logged = 0usize;
        for segment in &segments {
            if segment.dropped > 0 {
                // A write torn by a crash, garbage, or the records of a recycled segment's earlier use.
                tracing::info!(
                    segment = segment.number,
                    records = segment.records.len(),
                    ignored_bytes = segment.dropped,
                    "log segment replayed up to the first record that fails its checks"
                );
            }
            // A round's records wait here for its commit record (segments with rounds); a round whose commit
            // record is missing (its write torn by a crash) is dropped whole.
            let mut round: Vec<Entry<'_>> = Vec::new();
            for payload in segment.payloads() {
                let mut entries = disk::entries(segment.number, payload)?;
                let entry = match entries.pop() {
                    Some(entry) if entries.is_empty() => entry,
                    _ => {
                        return Err(StoreError::Corrupt {
                            id: format!("log segment {:016x}", segment.number),
                            message: format!("a record holds {} entries, not one", entries.len() + 1),
                        })
                    }
                };
                let commit = matches!(entry, Entry::Delete { id } if id == wal::COMMIT_ID);
                if !commit {
                    round.push(entry);
                    if segment.rounds {
                        continue;
                    }
                }
                for entry in round.drain(..) {
                    match entry {
                        Entry::Put { id, body, .. } => {
                            bodies.insert(id, (true, body));
                            to_checkpoint.insert(Id::from(id), Dirty::Put);
                        }
                        Entry::Delete { id } => {
                            bodies.remove(id);
                            to_checkpoint.insert(Id::from(id), Dirty::Delete);
                        }
                    }
                    logged += 1;
                }
            }
            if !round.is_empty() {
                tracing::warn!(
                    segment = segment.number,
                    records = round.len(),
                    "log round without its commit record (a write torn by a crash): dropped whole"
                );
            }
        }
        let mut records = Vec::with_capacity(bodies.len());
        for (id, (from_log, body)) in bodies {
            records.push((disk::decode(id, body)?, from_log));
        }
        // FIFO within a priority is `seq` order, which the records keep.
        records.sort_by_key(|(r, _)| r.seq);
        let mut requeued = 0;
        for (mut record, from_log) in records {
            // One allocation of the id for both the journal's account and the record.
            journal.share_id(&record.id);
            st.next_seq = st.next_seq.max(record.seq);
            st.hold_unique(&record, now);
            if record.state.is_terminal() {
                let meta = DoneMeta::of(&record);
                st.expiry.insert((meta.expires_at_ms, record.id.clone()));
                st.add_dead(&record.id, &meta);
                st.done.insert(record.id.clone(), meta);
                if from_log {
                    // Not in sled yet: kept in memory until the checkpoint writes it.
                    st.generation += 1;
                    let generation = st.generation;
                    st.finished.insert(record.id.clone(), (generation, Arc::new(record)));
                }
                continue;
            }
            if record.extra.as_ref().is_some_and(|e| e.waiting) {
                // A chord's callback waiting for its members: in no queue ([`canvas`]).
                st.index_links(&record);
                st.live.insert(record.id.clone(), Arc::new(record));
                continue;
            }
            if record.state == TaskState::Started {
                // Leased when the daemon stopped. A lease is not noted for writing, but a later write of the same
                // record (a revoke, or another change in the same round) can carry it: undo the interrupted attempt.
                record.state = TaskState::Pending;
                record.started_at_ms = None;
                record.attempts = record.attempts.saturating_sub(1);
                requeued += 1;
                if record.revoked {
                    self.finish_revoked(&mut st, record, now, None);
                    continue;
                }
                st.touch(&record.id);
            }
            match record.eta_ms {
                Some(eta) if eta > now && matches!(record.state, TaskState::Scheduled | TaskState::Retry) => {
                    st.scheduled.insert((eta, record.id.clone()), record.queue.clone());
                    st.queue(&record.queue).scheduled += 1;
                }
                _ => {
                    if record.state == TaskState::Scheduled {
                        record.state = TaskState::Pending;
                        st.touch(&record.id);
                    }
                    let key = record.ready_key();
                    st.queue(&record.queue).ready.insert(key, record.id.clone());
                }
            }
            st.index_links(&record);
            st.live.insert(record.id.clone(), Arc::new(record));
        }
        self.recount_chords(&mut st);
        // What recovery changed goes to sled with what the log held, in the checkpoint that follows.
        let notes = std::mem::take(&mut st.to_log);
        to_checkpoint.extend(notes);
        let (bytes, current) = journal.size();
        tracing::info!(
            live = st.live.len(),
            requeued,
            results = st.done.len(),
            journal_bytes = bytes,
            current_bytes = current,
            log_segments = segments.len(),
            log_records = logged,
            "store recovered"
        );
        Ok(next_segment)
    }

    /// A task id the daemon makes: the millisecond (48 bits) and a counter (16 bits), so ids sort by time and
    /// arrive in order (sled and the indexes insert them near each other), then 32 random bits, so that nobody
    /// finds another client's task by counting. The counter is the task's sequence number, which grows at every
    /// enqueue, so ids made while the clock moves forward cannot repeat; only after the clock went back is an id
    /// checked against the tasks there are (and drawn again in the rare case it is taken).
    fn new_id(&self, st: &mut State) -> TaskId {
        let now = self.now_ms();
        let backwards = now < st.last_id_ms;
        st.last_id_ms = st.last_id_ms.max(now);
        loop {
            let id =
                format!("{:012x}{:04x}{:08x}", now & 0xffff_ffff_ffff, st.next_seq & 0xffff, rand::random::<u32>());
            if !backwards || st.state_of(&id).is_none() {
                return id;
            }
        }
    }

    /// Checks a task spec's fields (the same for every store).
    pub(crate) fn validate(spec: &NewTask) -> Result<(), StoreError> {
        if let Some(id) = &spec.id {
            validate_name("id", id)?;
        }
        if let Some(queue) = &spec.queue {
            validate_queue(queue)?;
        }
        validate_name("task", &spec.task)?;
        if spec.countdown_ms.is_some() && spec.eta_ms.is_some() {
            return Err(StoreError::Invalid("give `countdown_ms` or `eta_ms`, not both".into()));
        }
        if spec.expires_at_ms.is_some() && spec.expires_in_ms.is_some() {
            return Err(StoreError::Invalid("give `expires_at_ms` or `expires_in_ms`, not both".into()));
        }
        if spec.lease_ms == Some(0) {
            return Err(StoreError::Invalid("`lease_ms` must be positive".into()));
        }
        if let Some(key) = &spec.unique_key {
            validate_name("unique_key", key)?;
        } else if spec.unique_for_ms.is_some() {
            return Err(StoreError::Invalid("`unique_for_ms` needs a `unique_key`".into()));
        }
        if spec.chain.len() > MAX_CHAIN {
            return Err(StoreError::Invalid(format!("a chain has at most {MAX_CHAIN} links")));
        }
        for (i, link) in spec.chain.iter().enumerate() {
            let invalid = |m: &str| StoreError::Invalid(format!("chain {i}: {m}"));
            if !link.chain.is_empty() {
                return Err(invalid("a chain's link has no chain of its own"));
            }
            if link.unique_key.is_some() {
                return Err(invalid("a chain's link has no unique key (its place in the chain is its id)"));
            }
            if link.id.is_some() && spec.chain[..i].iter().any(|l| l.id == link.id)
                || link.id == spec.id && link.id.is_some()
            {
                return Err(invalid("two tasks of the chain have the same id"));
            }
            Self::validate(&NewTask::from(link.clone())).map_err(|e| invalid(&e.to_string()))?;
        }
        Ok(())
    }

    /// Stores new tasks (or finds existing ones by id). All are validated before any is stored.
    pub fn enqueue(&self, specs: Vec<NewTask>) -> Result<Vec<Enqueued>, StoreError> {
        for (i, spec) in specs.iter().enumerate() {
            check_client_ids(spec).map_err(|e| match e {
                StoreError::Invalid(m) if specs.len() > 1 => StoreError::Invalid(format!("task {i}: {m}")),
                other => other,
            })?;
        }
        self.enqueue_checked(specs)
    }

    /// [`Store::enqueue`] for specs whose ids the daemon chose (a schedule's tick).
    fn enqueue_checked(&self, specs: Vec<NewTask>) -> Result<Vec<Enqueued>, StoreError> {
        for (i, spec) in specs.iter().enumerate() {
            Self::validate(spec).map_err(|e| match e {
                StoreError::Invalid(m) if specs.len() > 1 => StoreError::Invalid(format!("task {i}: {m}")),
                other => other,
            })?;
        }
        let now = self.now_ms();
        let mut out = Vec::with_capacity(specs.len());
        let mut woke = false;
        let mut st = self.lock();
        if self.options.max_queue_length > 0 {
            Self::check_room(&st, &specs, self.options.max_queue_length)?;
        }
        for spec in specs {
            let (enqueued, ready) = self.insert(&mut st, spec, now, None);
            woke |= ready;
            out.push(enqueued);
        }
        drop(st);
        if woke {
            self.ready_notify.notify_waiters();
        }
        Ok(out)
    }

    /// Leases up to `max` ready tasks from `queues`, in queue order, for connection `conn`. Also says whether
    /// any of them is not on disk yet (enqueued or changed since the last flush): the reply must then wait for
    /// a flush, so a worker never runs a task that a crash could un-enqueue. A lease itself is never written.
    pub fn lease(&self, conn: ConnId, queues: &[String], max: usize, lease_ms: Option<u64>) -> (Vec<Grant>, bool) {
        let now = self.now_ms();
        let mut out = Vec::new();
        let mut expired = false;
        let mut st = self.lock();
        let mut bytes = 0usize;
        for queue in queues {
            if st.flow.paused(queue) {
                continue;
            }
            let limited = st.flow.limited();
            let (mut cursor, mut skipped) = (None, 0);
            while out.len() < max && bytes < self.options.max_reply_bytes {
                let next = if limited {
                    flow::take_limited(&mut st, queue, now, &mut cursor, &mut skipped)
                } else {
                    st.queues.get_mut(queue.as_str()).and_then(|q| q.ready.pop_first()).map(|(_, id)| id)
                };
                let Some(id) = next else { break };
                let Some(record) = st.live.get_mut(&id) else { continue };
                if record.expires_at_ms.is_some_and(|e| e <= now) {
                    let record = st.take_live(&id).expect("live");
                    if limited {
                        // Its slot is free again (the token it took is spent).
                        st.flow.end(&record.queue, &record.task);
                    }
                    self.finish_revoked(&mut st, record, now, Some(expired_error()));
                    expired = true;
                    continue;
                }
                let lease_ms = lease_ms.unwrap_or(record.lease_ms).clamp(1, self.options.max_lease_ms);
                let ready_since = record.eta_ms.unwrap_or(record.created_at_ms);
                let waited = now.saturating_sub(ready_since) as f64 / 1000.0;
                let record = Arc::make_mut(record);
                record.state = TaskState::Started;
                record.attempts += 1;
                record.started_at_ms = Some(now);
                if let Some(extra) = record.extra.as_deref_mut() {
                    // A new attempt has reported nothing yet.
                    extra.progress = None;
                }
                let deadline_ms = now.saturating_add(lease_ms);
                let leased = Grant {
                    id: id.to_string(),
                    lease_id: 0,
                    queue: record.queue.clone(),
                    task: record.task.clone(),
                    payload: record.payload.clone(),
                    attempt: record.attempts,
                    max_retries: record.max_retries,
                    deadline_ms,
                    lease_ms,
                };
                // A lease is not written: it lives in memory, and a restart returns the task to its queue anyway.
                let lease_id = new_lease_id();
                st.leases.insert(
                    id.clone(),
                    LeaseEntry { lease_id, deadline_ms, lease_ms, conn, queue: leased.queue.clone() },
                );
                st.deadlines.insert((deadline_ms, id.clone()));
                st.by_conn.entry(conn).or_default().insert(id.clone());
                st.queue(queue).leased += 1;
                bytes += leased.payload.len() + leased.task.len() + leased.id.len();
                let took = Some(Took::Waited(waited));
                self.happened_after(&mut st, &id, &leased.queue, &leased.task, Outcome::started, now, took);
                out.push(Grant { lease_id, ..leased });
            }
        }
        let log_failed = self.core.progress.borrow().failed.is_some();
        let unflushed = log_failed
            || out
                .iter()
                .any(|task| st.to_log.contains_key(task.id.as_str()) || st.logging.contains_key(task.id.as_str()));
        drop(st);
        if expired {
            self.finished_notify.notify_waiters();
        }
        (out, unflushed)
    }

    /// Counts an attempt's outcome and how long it ran.
    fn ran(&self, st: &mut State, record: &TaskRecord, now: u64, outcome: Outcome) {
        let took = record.started_at_ms.map(|started| Took::Ran(now.saturating_sub(started) as f64 / 1000.0));
        self.happened_after(st, &record.id, &record.queue, &record.task, outcome, now, took);
    }

    /// Something happened to a task: counted for `/metrics`, and kept for `events` while someone follows them.
    fn happened(&self, st: &mut State, id: &Id, queue: &str, task: &str, outcome: Outcome, now: u64) {
        self.happened_after(st, id, queue, task, outcome, now, None);
    }

    /// [`Store::happened`], observing how long the task waited or ran before it (one metrics lookup for both).
    #[allow(clippy::too_many_arguments)]
    fn happened_after(
        &self,
        st: &mut State,
        id: &Id,
        queue: &str,
        task: &str,
        outcome: Outcome,
        now: u64,
        took: Option<Took>,
    ) {
        st.metrics.of(&self.core.metrics, queue, task).happened(outcome, took);
        if !st.events.wanted(now) {
            return;
        }
        st.events.push(now, id.clone(), queue.to_string(), task.to_string(), outcome);
        self.events_notify.notify_waiters();
    }

    /// The task events after `after` (from now when `None`), at most `max`, of `queue` only if given: (events,
    /// the cursor to ask from next, how many events after `after` were dropped from the ring before this call).
    /// Asking keeps events recorded for the next `EVENT_LINGER_MS`.
    pub fn events(
        &self,
        after: Option<u64>,
        max: usize,
        queue: Option<&str>,
        wait_ms: u64,
    ) -> (Vec<TaskEvent>, u64, u64) {
        let now = self.now_ms();
        self.lock().events.read(after, max, queue, now, wait_ms)
    }

    /// Woken when an event is recorded.
    pub fn events_notify(&self) -> &Notify {
        &self.events_notify
    }

    /// Whether connection `conn` holds leases now.
    pub fn holds_leases(&self, conn: ConnId) -> bool {
        self.lock().by_conn.get(&conn).is_some_and(|ids| !ids.is_empty())
    }

    /// Whether the log has failed (a write or sync error): nothing is acknowledged as durable any more.
    pub fn log_failed(&self) -> bool {
        self.core.progress.borrow().failed.is_some()
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.core.metrics
    }

    /// Refuses a batch (all of it) that would take a queue past `limit` waiting tasks; specs naming a task that
    /// exists add nothing.
    fn check_room(st: &State, specs: &[NewTask], limit: u64) -> Result<(), StoreError> {
        let mut adding: Vec<(&str, u64)> = Vec::new();
        for spec in specs {
            if spec.id.as_ref().is_some_and(|id| st.state_of(id).is_some()) {
                continue;
            }
            let queue = spec.queue.as_deref().unwrap_or(DEFAULT_QUEUE);
            match adding.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, n)) => *n += 1,
                None => adding.push((queue, 1)),
            }
        }
        for (queue, n) in adding {
            let waiting = st.queues.get(queue).map_or(0, |q| q.ready.len() as u64 + q.scheduled);
            if waiting + n > limit {
                return Err(StoreError::QueueFull { queue: queue.to_string(), waiting, limit });
            }
        }
        Ok(())
    }

    /// Checks that `lease_id` on `id` is held.
    fn check_lease(st: &State, id: &str, lease_id: u64) -> Result<(), StoreError> {
        match st.leases.get(id) {
            Some(entry) if entry.lease_id == lease_id && st.live.contains_key(id) => Ok(()),
            _ => Err(StoreError::LeaseLost { id: id.to_string(), lease_id }),
        }
    }

    /// Ends a held lease and takes the task's record out of `live` for the caller to place again.
    fn take_leased(&self, st: &mut State, id: &str, lease_id: u64) -> Result<(LeaseEntry, TaskRecord), StoreError> {
        Self::check_lease(st, id, lease_id)?;
        let entry = st.remove_lease(id).expect("checked lease");
        let record = st.take_live(id).expect("checked record");
        Ok((entry, record))
    }

    /// Ends a held lease to record an outcome. A task revoked while it ran is finished as `REVOKED` instead, and
    /// the outcome is refused.
    fn take_for_outcome(
        &self,
        st: &mut State,
        id: &str,
        lease_id: u64,
        now: u64,
    ) -> Result<(LeaseEntry, TaskRecord), StoreError> {
        let (entry, record) = self.take_leased(st, id, lease_id)?;
        if record.revoked {
            self.finish_revoked(st, record, now, None);
            self.finished_notify.notify_waiters();
            return Err(StoreError::Revoked(id.to_string()));
        }
        Ok((entry, record))
    }

    /// Completes a leased task with its result.
    pub fn ack(&self, id: &str, lease_id: u64, result: Value) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        let (entry, mut record) = self.take_for_outcome(&mut st, id, lease_id, now)?;
        self.ran(&mut st, &record, now, Outcome::succeeded);
        record.state = TaskState::Success;
        record.result = Some(Box::new(result));
        record.error = None;
        let ttl = record.result_ttl_ms;
        self.finish(&mut st, record, now, ttl);
        st.queue(&entry.queue).succeeded += 1;
        st.totals.succeeded += 1;
        let readied = std::mem::take(&mut st.flow.freed) | std::mem::take(&mut st.readied);
        let chords = !st.chords_ready.is_empty();
        drop(st);
        self.finished_notify.notify_waiters();
        if readied {
            self.ready_notify.notify_waiters();
        }
        if chords {
            if let Err(e) = self.release_chords() {
                tracing::error!(error = %e, "releasing chord callbacks failed; the next tick tries again");
            }
        }
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
        let mut st = self.lock();
        let (entry, mut record) = self.take_for_outcome(&mut st, id, lease_id, now)?;
        self.ran(&mut st, &record, now, Outcome::failed);
        st.queue(&entry.queue).failed += 1;
        st.totals.failed += 1;
        record.error = Some(Box::new(error));
        if retry && record.attempts <= record.max_retries {
            let (record_id, record_task) = (record.id.clone(), record.task.clone());
            let retry_at = now.saturating_add(countdown_ms.unwrap_or_else(|| record.backoff_ms()));
            record.state = TaskState::Retry;
            self.schedule(&mut st, record, retry_at, now);
            st.totals.retried += 1;
            self.happened(&mut st, &record_id, &entry.queue, &record_task, Outcome::retried, now);
            drop(st);
            self.ready_notify.notify_waiters();
            return Ok(FailOutcome { state: TaskState::Retry, retry_at_ms: Some(retry_at) });
        }
        self.bury(&mut st, record, now);
        let freed = std::mem::take(&mut st.flow.freed);
        drop(st);
        self.finished_notify.notify_waiters();
        if freed {
            self.ready_notify.notify_waiters();
        }
        Ok(FailOutcome { state: TaskState::Failure, retry_at_ms: None })
    }

    /// Pushes a lease's deadline to now + `lease_ms` (or the lease's own duration). Reports revocation.
    pub fn extend(&self, id: &str, lease_id: u64, lease_ms: Option<u64>) -> Result<(u64, bool), StoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        Self::check_lease(&st, id, lease_id)?;
        let revoked = st.live.get(id).is_some_and(|r| r.revoked);
        let entry = st.leases.get_mut(id).expect("checked lease");
        let old = entry.deadline_ms;
        let lease_ms = lease_ms.unwrap_or(entry.lease_ms).clamp(1, self.options.max_lease_ms);
        entry.deadline_ms = now.saturating_add(lease_ms);
        entry.lease_ms = lease_ms;
        let new = entry.deadline_ms;
        let id = st.leases.get_key_value(id).expect("checked lease").0.clone();
        st.deadlines.remove(&(old, id.clone()));
        st.deadlines.insert((new, id));
        Ok((new, revoked))
    }

    /// Stores what a running task says of its progress (`get` shows it). Returns whether the task was revoked
    /// (as `extend` does: the worker should stop it).
    pub fn progress(
        &self,
        id: &str,
        lease_id: u64,
        progress: broker_client::proto::Progress,
    ) -> Result<bool, StoreError> {
        validate_name("state", &progress.state)?;
        let mut st = self.lock();
        Self::check_lease(&st, id, lease_id)?;
        let id = st.leases.get_key_value(id).expect("checked lease").0.clone();
        let record = Arc::make_mut(st.live.get_mut(&id).expect("checked lease"));
        let revoked = record.revoked;
        let extra = record.extra_mut();
        // Logged at most once a second per task: each log record holds the whole task, arguments included, and
        // a task may report many times a second. A report in between is logged with the task's next change.
        let log = extra.progress.as_ref().is_none_or(|last| progress.at_ms.saturating_sub(last.at_ms) >= 1000);
        extra.progress = Some(progress);
        if log {
            st.touch(&id);
        }
        Ok(revoked)
    }

    /// Gives a leased task back unrun; the attempt does not count. A revoked task is finished instead.
    pub fn release(&self, id: &str, lease_id: u64) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        let (_, mut record) = self.take_leased(&mut st, id, lease_id)?;
        if record.revoked {
            self.finish_revoked(&mut st, record, now, None);
            drop(st);
            self.finished_notify.notify_waiters();
            return Ok(());
        }
        record.attempts = record.attempts.saturating_sub(1);
        self.return_to_queue(&mut st, record, now);
        drop(st);
        self.ready_notify.notify_waiters();
        Ok(())
    }

    /// A lease ended without an outcome (deadline passed, or its connection closed): the task goes back to its
    /// queue, the attempt counted, unless it was revoked or has lost too many leases. A lease lost because the
    /// daemon is shutting down is not held against the task (`count` false).
    fn lose_lease(&self, st: &mut State, id: &str, now: u64, why: &str, count: bool) {
        if st.remove_lease(id).is_none() {
            return;
        }
        let Some(mut record) = st.take_live(id) else { return };
        st.totals.lease_lost += 1;
        self.happened(st, &record.id, &record.queue, &record.task, Outcome::lease_lost, now);
        if count {
            record.lease_losses += 1;
        }
        tracing::debug!(task = %id, why, losses = record.lease_losses, "lease lost");
        if record.revoked {
            return self.finish_revoked(st, record, now, None);
        }
        if record.lease_losses >= self.options.max_lease_losses {
            record.error = Some(Box::new(TaskError {
                kind: "LeaseLost".into(),
                message: format!("lease lost {} times ({why}); giving up", record.lease_losses),
                traceback: None,
            }));
            return self.bury(st, record, now);
        }
        self.return_to_queue(st, record, now)
    }

    /// Releases every lease held by a closed connection. `shutting_down`: the daemon is stopping, so the
    /// losses do not count towards `max_lease_losses`.
    pub fn release_connection(&self, conn: ConnId, shutting_down: bool) -> usize {
        let now = self.now_ms();
        let mut st = self.lock();
        let ids: Vec<Id> = st.by_conn.get(&conn).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        let why = if shutting_down { "daemon shutting down" } else { "worker disconnected" };
        for id in &ids {
            self.lose_lease(&mut st, id, now, why, !shutting_down);
        }
        drop(st);
        if !ids.is_empty() {
            self.ready_notify.notify_waiters();
            self.finished_notify.notify_waiters();
        }
        ids.len()
    }

    /// Periodic work: due schedules become ready, passed lease deadlines are lost, expired results are removed.
    pub fn tick(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        let mut woke = false;
        while let Some(entry) = st.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, id), queue) = entry.remove_entry();
            decrement(&mut st.queue(&queue).scheduled);
            // Due now: it joins the back of its priority, like a task enqueued now.
            let seq = st.take_seq(now);
            let Some(record) = st.live.get_mut(&id) else { continue };
            let record = Arc::make_mut(record);
            if record.state == TaskState::Scheduled {
                record.state = TaskState::Pending;
            }
            record.seq = seq;
            let key = record.ready_key();
            st.touch(&id);
            st.queue(&queue).ready.insert(key, id);
            woke = true;
        }
        while st.unique_expiry.first().is_some_and(|(until, _)| *until <= now) {
            let (until, key) = st.unique_expiry.pop_first().expect("just checked");
            if st.unique.get(&key).is_some_and(|(_, u)| *u == Some(until)) {
                st.unique.remove(&key);
            }
        }
        // A rate limit that held tasks back has a token again: leases waiting on them look again.
        if st.flow.wake_at.is_some_and(|at| at <= now) {
            st.flow.wake_at = None;
            woke = true;
        }
        while st.deadlines.first().is_some_and(|(deadline, _)| *deadline <= now) {
            let (_, id) = st.deadlines.pop_first().expect("just checked");
            self.lose_lease(&mut st, &id, now, "lease deadline passed", true);
            woke = true;
        }
        drop(st);
        if woke {
            self.ready_notify.notify_waiters();
            self.finished_notify.notify_waiters();
        }
        if self.expire_results(now) > 0 {
            self.finished_notify.notify_waiters();
        }
        let chords = self.release_chords();
        self.run_schedules()?;
        chords
    }

    /// Rewrites the data directory if sled's files are much larger than the journal in them (see
    /// [`Config::shrink_min_bytes`]). Returns whether it did.
    pub fn shrink_if_bloated(&self) -> Result<bool, StoreError> {
        let disk = &self.core.disk;
        let on_disk = disk.size_on_disk()?;
        let (journal, _) = self.journal_size();
        if on_disk <= self.options.shrink_min_bytes.max(journal.saturating_mul(4)) {
            return Ok(false);
        }
        // Write-outs pause only while the copy starts and while it is finished, not while it is made.
        let order = || self.core.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let rewrite = {
            let _order = order();
            disk.begin_rewrite()?
        };
        disk.copy_for_rewrite(&rewrite)?;
        let (before, after) = {
            let _order = order();
            disk.finish_rewrite(rewrite)?
        };

        tracing::info!(
            before,
            after,
            journal,
            took_ms = started.elapsed().as_millis() as u64,
            "data directory rewritten"
        );
        Ok(true)
    }

    /// Removes results whose TTL has passed.
    fn expire_results(&self, now: u64) -> usize {
        let mut st = self.lock();
        let mut expired = 0;
        for _ in 0..EXPIRY_BATCH {
            let Some((at, id)) = st.expiry.pop_first() else { break };
            if at > now {
                st.expiry.insert((at, id));
                break;
            }
            // A task that changed since (requeued, or finished again) has its own, newer entry.
            if st.done.get(&id).is_none_or(|meta| meta.expires_at_ms != at) || st.live.contains_key(&id) {
                continue;
            }
            st.delete(&id);
            st.totals.expired_results += 1;
            expired += 1;
        }
        drop(st);
        if expired > 0 {
            tracing::debug!(expired, "results expired");
        }
        expired
    }

    /// Calls `f` on a task's record, wherever it is: in memory, or read back from the journal.
    fn with_record<T>(&self, id: &str, f: impl Fn(&TaskRecord) -> T) -> Result<Option<T>, StoreError> {
        // A compaction can move the record between reading its place and reading the chunk: look again.
        for _ in 0..1000 {
            {
                let st = self.lock();
                if let Some(record) = st.record(id) {
                    return Ok(Some(f(record)));
                }
                if !st.done.contains_key(id) {
                    return Ok(None);
                }
            }
            // A finished record leaves memory only once the journal has its place, so no place means it was
            // removed (expired, requeued) since: look again.
            let Some(loc) = self.core.journal().loc(id) else { continue };
            if let Some(record) = self.core.disk.read(id, loc)? {
                return Ok(Some(f(&record)));
            }
            // Its chunk was removed by a checkpoint slice that is noting the records' new places right now (a
            // moment: the places are set just after the batch is applied). Waiting for the whole checkpoint instead
            // could hold this thread for seconds.
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(StoreError::Flush(format!("the record of {id} kept moving while being read")))
    }

    /// Reads a task as the `get` reply's body (see [`TaskRecord::info_bytes`]), with its state.
    pub fn get_encoded(&self, id: &str) -> Result<(TaskState, Vec<u8>), StoreError> {
        let encoded = match self.with_record(id, |r| (r.state, r.info_bytes()))? {
            Some(encoded) => encoded,
            None => {
                let link = self.lock().pending_link(id).map(|r| (r.state, r.info_bytes()));
                link.ok_or_else(|| StoreError::NotFound(id.to_string()))?
            }
        };
        let (state, bytes) = encoded;
        let bytes = bytes.map_err(|message| StoreError::Corrupt { id: id.to_string(), message })?;
        Ok((state, bytes))
    }

    /// Reads a task.
    pub fn get(&self, id: &str) -> Result<TaskInfo, StoreError> {
        match self.with_record(id, TaskRecord::info)? {
            Some(info) => Ok(info),
            None => self.lock().pending_link(id).map(|r| r.info()).ok_or_else(|| StoreError::NotFound(id.to_string())),
        }
    }

    /// Revokes a task; returns its state afterwards.
    pub fn revoke(&self, id: &str) -> Result<TaskState, StoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        let Some(record) = st.live.get_mut(id) else {
            drop(st);
            return self.get(id).map(|info| info.state);
        };
        if record.state == TaskState::Started {
            let record = Arc::make_mut(record);
            record.revoked = true;
            let id = record.id.clone();
            st.touch(&id);
            return Ok(TaskState::Started);
        }
        let record = st.take_live(id).expect("live");
        self.unqueue(&mut st, &record);
        self.finish_revoked(&mut st, record, now, None);
        drop(st);
        self.finished_notify.notify_waiters();
        Ok(TaskState::Revoked)
    }

    /// Deletes every ready or scheduled task of `queue`.
    pub fn purge(&self, queue: &str) -> u64 {
        let mut st = self.lock();
        let mut ids: Vec<Id> = match st.queues.get_mut(queue) {
            Some(q) => std::mem::take(&mut q.ready).into_values().collect(),
            None => return 0,
        };
        let due: Vec<(u64, Id)> =
            st.scheduled.iter().filter(|(_, q)| q.as_str() == queue).map(|(k, _)| k.clone()).collect();
        for key in due {
            st.scheduled.remove(&key);
            decrement(&mut st.queue(queue).scheduled);
            ids.push(key.1);
        }
        let now = self.now_ms();
        for id in &ids {
            let callback = st.live.get(id).and_then(|r| r.extra.as_ref()).and_then(|e| e.chord.clone());
            st.delete(id);
            if let Some((callback, _)) = callback {
                // A purged member will never succeed: its chord fails now rather than wait for ever.
                let error = TaskError {
                    kind: "ChordError".into(),
                    message: format!("chord member {id} was purged"),
                    traceback: None,
                };
                self.fail_callback(&mut st, &callback, error, now);
            }
        }
        drop(st);
        self.finished_notify.notify_waiters();
        ids.len() as u64
    }

    /// Ids in the dead set: of one queue or all (`"*"` or `None`); per queue oldest failure first, queues in
    /// name order.
    fn dead_ids(&self, queue: Option<&str>, limit: usize) -> Vec<Id> {
        let st = self.lock();
        let sets: Vec<&BTreeSet<(u64, Id)>> = match queue {
            Some(q) if q != "*" => st.dead.get(q).into_iter().collect(),
            _ => st.dead.values().collect(),
        };
        sets.into_iter().flatten().take(limit).map(|(_, id)| id.clone()).collect()
    }

    /// Lists dead tasks: per queue, oldest failure first; queues in name order.
    pub fn dead_list(&self, queue: Option<&str>, limit: usize) -> Result<Vec<TaskInfo>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for id in self.dead_ids(queue, limit) {
            if let Some((info, size)) = self.with_record(&id, |r| (r.info(), r.payload.len() + r.result_len()))? {
                if info.state == TaskState::Failure {
                    // The reply always carries one task; past that, none that would take it over the bound.
                    if !out.is_empty() && bytes + size > self.options.max_reply_bytes {
                        break;
                    }
                    bytes += size;
                    out.push(info);
                }
            }
        }
        Ok(out)
    }

    /// Deletes a finished task (its result or error) now rather than at its TTL. Refused for a task not finished
    /// (revoke it first).
    pub fn delete_finished(&self, id: &str) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.live.contains_key(id) {
            return Err(StoreError::Invalid(format!("task {id:?} has not finished: revoke it first")));
        }
        let Some((key, _)) = st.done.get_key_value(id) else { return Err(StoreError::NotFound(id.to_string())) };
        let key = key.clone();
        st.delete(&key);
        Ok(())
    }

    /// What each connection's leases are running: (task id, task name, started at), oldest first, at most
    /// `limit` per connection.
    pub fn running_by_conn(&self, limit: usize) -> Vec<(ConnId, Vec<Running>)> {
        let st = self.lock();
        st.by_conn
            .iter()
            .map(|(conn, ids)| {
                let mut running: Vec<Running> = ids
                    .iter()
                    .filter_map(|id| st.live.get(id))
                    .map(|r| (r.id.to_string(), r.task.clone(), r.started_at_ms.unwrap_or(0)))
                    .collect();
                running.sort_by_key(|(_, _, started)| *started);
                running.truncate(limit);
                (*conn, running)
            })
            .collect()
    }

    /// Puts dead tasks back in their queues as new tasks.
    pub fn dead_requeue(&self, request: &DeadRequeue) -> Result<u64, StoreError> {
        let mut ids: Vec<Id> = request.ids.iter().map(|id| Id::from(id.as_str())).collect();
        if let Some(queue) = &request.queue {
            ids.extend(self.dead_ids(Some(queue), usize::MAX));
        }
        let now = self.now_ms();
        let mut count = 0;
        for id in ids {
            let Some(mut record) = self.with_record(&id, TaskRecord::clone)? else { continue };
            let mut st = self.lock();
            // Still the same failure (nothing requeued or removed it meanwhile)?
            // Only what is in the dead set: a task failed by the task it depended on never ran, and would run
            // without that task's result (requeue the failed task instead: its chain then resumes).
            match st.done.get(&*id) {
                Some(meta)
                    if meta.state == TaskState::Failure
                        && meta.dead_queue.is_some()
                        && Some(meta.finished_at_ms) == record.finished_at_ms => {}
                _ => continue,
            }
            st.forget_done(&id);
            record.attempts = 0;
            record.lease_losses = 0;
            record.error = None;
            record.finished_at_ms = None;
            record.result_expires_at_ms = None;
            record.eta_ms = None;
            record.state = TaskState::Pending;
            st.hold_unique(&record, now);
            self.return_to_queue(&mut st, record, now);
            count += 1;
        }
        if count > 0 {
            self.ready_notify.notify_waiters();
        }
        Ok(count)
    }

    /// Whether the task is in the dead set (`FAILURE` after running; not a task failed by the one it depended
    /// on, which `dead_requeue` skips).
    pub fn in_dead_set(&self, id: &str) -> bool {
        self.lock().done.get(id).is_some_and(|meta| meta.dead_queue.is_some())
    }

    /// The totals of `stats` (counted since start).
    pub fn totals(&self) -> Totals {
        self.lock().totals.clone()
    }

    /// Counts for `stats`.
    pub fn stats(&self) -> StoreStats {
        let st = self.lock();
        StoreStats {
            queues: st
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
                    paused: st.flow.paused(name),
                })
                .collect(),
            totals: st.totals.clone(),
            results_stored: st.done.len() as u64,
            leases_by_conn: st.by_conn.iter().map(|(c, s)| (*c, s.len() as u64)).collect(),
        }
    }

    // --- transitions shared by the operations above -------------------------------------------------------

    /// Takes a waiting task out of the ready or scheduled index.
    fn unqueue(&self, st: &mut State, record: &TaskRecord) {
        if let Some(q) = st.queues.get_mut(&record.queue) {
            if q.ready.remove(&record.ready_key()).is_some() {
                return;
            }
        }
        if let Some(eta) = record.eta_ms {
            if st.scheduled.remove(&(eta, record.id.clone())).is_some() {
                decrement(&mut st.queue(&record.queue).scheduled);
            }
        }
    }

    /// Makes a task ready now, at the back of its priority.
    fn return_to_queue(&self, st: &mut State, mut record: TaskRecord, now: u64) {
        if record.state != TaskState::Retry {
            record.state = TaskState::Pending;
        }
        self.schedule(st, record, now, now)
    }

    /// Queues a live task for `at`: ready at once if due, else scheduled.
    fn schedule(&self, st: &mut State, mut record: TaskRecord, at: u64, now: u64) {
        record.started_at_ms = None;
        record.seq = st.take_seq(now);
        if at > now {
            record.eta_ms = Some(at);
            st.scheduled.insert((at, record.id.clone()), record.queue.clone());
            st.queue(&record.queue).scheduled += 1;
        } else {
            if record.state == TaskState::Retry {
                record.eta_ms = Some(at);
            }
            st.queue(&record.queue).ready.insert(record.ready_key(), record.id.clone());
        }
        st.touch(&record.id);
        st.live.insert(record.id.clone(), Arc::new(record));
    }

    /// Makes a task terminal: its result expires `ttl_ms` from now.
    fn finish(&self, st: &mut State, mut record: TaskRecord, now: u64, ttl_ms: u64) {
        let expires = now.saturating_add(ttl_ms);
        record.finished_at_ms = Some(now);
        record.result_expires_at_ms = Some(expires);
        let workflow = record.extra.as_ref().is_some_and(|e| !e.chain.is_empty() || e.chord.is_some());
        let mut done = workflow.then(|| record.clone());
        if record.state == TaskState::Success {
            // The chain moves on to the next link (in this commit: a log round is all or nothing), so a
            // succeeded task keeps none.
            if let Some(extra) = record.extra.as_deref_mut() {
                extra.chain.clear();
            }
        }
        st.retire(record);
        if let Some(done) = done.take() {
            self.follow_up(st, &done, now);
        }
    }

    fn finish_revoked(&self, st: &mut State, mut record: TaskRecord, now: u64, error: Option<TaskError>) {
        // Only expiry passes an error.
        let outcome = if error.is_some() { Outcome::expired } else { Outcome::revoked };
        record.state = TaskState::Revoked;
        record.revoked = true;
        if error.is_some() {
            record.error = error.map(Box::new);
        }
        st.totals.revoked += 1;
        self.happened(st, &record.id, &record.queue, &record.task, outcome, now);
        let ttl = record.result_ttl_ms;
        self.finish(st, record, now, ttl)
    }

    /// Moves a task to the dead set (`FAILURE`).
    fn bury(&self, st: &mut State, mut record: TaskRecord, now: u64) {
        record.state = TaskState::Failure;
        st.totals.dead += 1;
        self.happened(st, &record.id, &record.queue, &record.task, Outcome::dead, now);
        let ttl = self.options.dead_ttl_ms.max(record.result_ttl_ms);
        self.finish(st, record, now, ttl)
    }
}

impl Drop for Store {
    /// A store dropped without [`Store::close`] (a failed start, a test) still stops its threads; what they had
    /// not written is in the log already, or lost like an unacknowledged change.
    fn drop(&mut self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        if !threads.is_empty() {
            self.core.stop_threads(threads);
        }
    }
}

pub(crate) fn expired_error() -> TaskError {
    TaskError { kind: "Expired".into(), message: "task expired before it started".into(), traceback: None }
}

/// Refuses the ids a client may not choose: a schedule tick's (`sched:`), for the task and its chain's links. A
/// client taking a tick's id would take the tick over, and a far-future one would stop the schedule.
pub(crate) fn check_client_ids(spec: &NewTask) -> Result<(), StoreError> {
    let ids = spec.id.iter().chain(spec.chain.iter().filter_map(|link| link.id.as_ref()));
    for id in ids {
        if id.starts_with(schedule::TICK_PREFIX) {
            return Err(StoreError::Invalid(format!(
                "ids starting `{}` are the schedules' own",
                schedule::TICK_PREFIX
            )));
        }
    }
    Ok(())
}

/// Checks a task id, task name or queue name: non-empty, at most [`MAX_ID_LEN`] bytes, no NUL.
pub fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > MAX_ID_LEN || name.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "`{what}` must be 1 to {MAX_ID_LEN} bytes with no NUL (got {} bytes)",
            name.len()
        )));
    }
    Ok(())
}

/// Checks a queue name: as [`validate_name`], and not `*`, which admin ops read as "every queue".
pub fn validate_queue(name: &str) -> Result<(), StoreError> {
    validate_name("queue", name)?;
    if name == "*" {
        return Err(StoreError::Invalid("`*` is not a queue name (admin ops read it as every queue)".into()));
    }
    Ok(())
}

/// A starting point for the id counter that differs between runs and processes.
/// A lease id: 64 random bits (never 0), so that a client cannot settle another's lease by guessing its id.
fn new_lease_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// Counters never wrap below zero, even if an index and a count ever disagree.
fn decrement(counter: &mut u64) {
    *counter = counter.saturating_sub(1);
}
