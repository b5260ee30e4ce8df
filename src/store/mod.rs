//! The store: the owner of every task's state, and (through [`disk`]) the only code that touches sled.
//!
//! Every non-terminal task lives in memory (`live`), with the queues built over it: what is ready and in which
//! order, what is scheduled for when, who holds which lease until when. Finished tasks are known in memory by
//! their state and expiry (`done`); their records are on disk, in a journal ([`disk`]). Operations change only
//! memory and note what changed (`dirty`); they never wait for the disk. The flusher ([`flush`]) then appends
//! the latest record of every task noted so far to the journal, as a few chunks in one sled batch, and flushes
//! (group commit). A reply that must be durable waits for the flush that follows its change
//! ([`Store::durable`]). Because a write-out carries only the latest state of each task, a task enqueued, leased
//! and acked between two flushes costs one record in one chunk.
//!
//! A finished task's record stays in memory (`finished`) only until it is on disk; after that `get` reads it
//! from its chunk. At startup the journal is read back and the queues rebuilt; tasks that were leased go back to
//! their queues. A lease itself is never written (it lives in memory), so a task's record on disk says `PENDING`
//! while it runs. Old chunks are removed or compacted as their records stop being current ([`journal`]).
//!
//! Time comes from the injected [`Clock`]; the store never reads the wall clock itself.

pub mod disk;
pub mod flush;
pub mod journal;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use broker_client::proto::{
    DeadRequeue, Enqueued, LeasedTask, QueueStats, TaskError, TaskId, TaskInfo, TaskSpec, TaskState, Totals, Value,
    DEFAULT_QUEUE, MAX_ID_LEN,
};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::{Config, FsyncPolicy};
use disk::{ChunkWriter, Disk, Entry, Loc};
use journal::Journal;
use record::{ReadyKey, TaskRecord};

/// The hash maps and sets of the store. Keys are task ids, often chosen by clients: foldhash is seeded at random
/// per process (so ids cannot be picked to collide), and several times faster than std's SipHash on short keys.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`Map`].
pub(crate) type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

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
    /// A background flush failed or could not run.
    #[error("flush failed: {0}")]
    Flush(String),
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
    /// Flush period (the only flushes under `interval`; background write-out under `always`).
    pub fsync_interval: Duration,
    /// See [`Config::shrink_min_bytes`].
    pub shrink_min_bytes: u64,
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
            shrink_min_bytes: config.shrink_min_bytes,
        }
    }
}

const DEFAULT_MAX_RETRIES: u32 = 3;
const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
const DEFAULT_RETRY_DELAY_MAX_MS: u64 = 3_600_000;
/// How many tasks a write-out handles per hold of the state lock, so requests never wait long for it.
const LOCK_BATCH: usize = 512;
/// How many expired results one tick removes at most, so a tick never stalls the daemon.
const EXPIRY_BATCH: usize = 10_000;

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

/// What to write for a task at the next write-out.
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
    expires_at_ms: u64,
    /// Its queue, if it is in the dead set (`FAILURE`).
    dead_queue: Option<String>,
    finished_at_ms: u64,
}

impl DoneMeta {
    fn of(record: &TaskRecord) -> DoneMeta {
        DoneMeta {
            state: record.state,
            expires_at_ms: record.result_expires_at_ms.unwrap_or(u64::MAX),
            dead_queue: (record.state == TaskState::Failure).then(|| record.queue.clone()),
            finished_at_ms: record.finished_at_ms.unwrap_or(0),
        }
    }
}

/// Everything in memory, behind one lock.
#[derive(Debug, Default)]
struct State {
    /// Every non-terminal task. Shared with a write-out in progress (which encodes outside the lock); a change
    /// to a record the write-out still holds copies it (`Arc::make_mut`).
    live: Map<TaskId, Arc<TaskRecord>>,
    /// Terminal tasks whose record is not on disk yet, with the generation of their last change.
    finished: Map<TaskId, (u64, Arc<TaskRecord>)>,
    /// Every finished task whose result is kept, on disk or not yet.
    done: Map<TaskId, DoneMeta>,
    /// (expire-at, id) of finished tasks; an entry whose task changed since is skipped when due.
    expiry: BTreeSet<(u64, TaskId)>,
    /// The dead set: per queue, (failed-at, id), oldest first.
    dead: BTreeMap<String, BTreeSet<(u64, TaskId)>>,
    dirty: Map<TaskId, Dirty>,
    /// The notes the write-out in progress took (shared with it, read-only): those tasks' places on disk are
    /// about to change, so until it is done their old place says nothing about what is durable.
    writing: Arc<Map<TaskId, Dirty>>,
    generation: u64,
    journal: Journal,
    /// Journal chunks numbered below this are flushed to disk.
    durable_below: u64,
    queues: BTreeMap<String, QueueIndex>,
    /// (due time, id) → queue.
    scheduled: BTreeMap<(u64, TaskId), String>,
    leases: Map<TaskId, LeaseEntry>,
    deadlines: BTreeSet<(u64, TaskId)>,
    by_conn: Map<ConnId, Set<TaskId>>,
    next_seq: u64,
    next_lease_id: u64,
    totals: Totals,
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

    /// Notes that a task's record changed.
    fn touch(&mut self, id: &str) {
        self.dirty.insert(id.to_string(), Dirty::Put);
    }

    /// Moves a task from `live` to `finished` (and `done`, the expiry index and, if it failed, the dead set).
    fn retire(&mut self, record: TaskRecord) {
        self.live.remove(&record.id);
        self.generation += 1;
        self.touch(&record.id);
        let meta = DoneMeta::of(&record);
        self.expiry.insert((meta.expires_at_ms, record.id.clone()));
        self.add_dead(&record.id, &meta);
        self.done.insert(record.id.clone(), meta);
        self.finished.insert(record.id.clone(), (self.generation, Arc::new(record)));
    }

    fn add_dead(&mut self, id: &str, meta: &DoneMeta) {
        if let Some(queue) = &meta.dead_queue {
            self.dead.entry(queue.clone()).or_default().insert((meta.finished_at_ms, id.to_string()));
            self.queue(queue).dead += 1;
        }
    }

    /// Forgets a finished task's result (expired, purged, or requeued): out of `done`, `finished` and the dead
    /// set. Returns what was known of it.
    fn forget_done(&mut self, id: &str) -> Option<DoneMeta> {
        self.finished.remove(id);
        let meta = self.done.remove(id)?;
        if let Some(queue) = &meta.dead_queue {
            if let Some(set) = self.dead.get_mut(queue) {
                set.remove(&(meta.finished_at_ms, id.to_string()));
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

    /// Forgets a task entirely and notes it.
    fn delete(&mut self, id: &str) {
        self.live.remove(id);
        self.forget_done(id);
        self.dirty.insert(id.to_string(), Dirty::Delete);
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
type Taken = (TaskId, Option<(Option<u64>, Arc<TaskRecord>)>);

/// What a write-out wrote, to be noted in [`Journal`] once it is in sled.
struct Written {
    chunks: Vec<disk::NewChunk>,
    puts: Vec<(TaskId, Loc)>,
    tombstones: Vec<TaskId>,
}

/// The memory and the disk, shared with the flusher task.
struct Core {
    disk: Disk,
    state: Mutex<State>,
    /// Held for a whole write-out, so write-outs reach sled in the order they were taken and the journal
    /// account changes under one writer.
    write_lock: Mutex<()>,
    /// Set when a write-out put changes in sled that no flush has covered yet.
    unflushed: AtomicBool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends every change noted so far to the journal, and removes or compacts old chunks (not flushed).
    /// Returns whether anything was written.
    fn write_out(&self) -> Result<bool, StoreError> {
        let _order = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let compact = self.lock().journal.to_compact();
        // Only write-outs change the journal, and this one holds the write lock: read without the state lock.
        let mut old = Vec::with_capacity(compact.len());
        for number in &compact {
            if let Some(bytes) = self.disk.chunk(*number)? {
                old.push((*number, bytes));
            }
        }
        let (notes, remove, first) = {
            let mut st = self.lock();
            let remove = st.journal.to_remove(&compact);
            if st.dirty.is_empty() && remove.is_empty() {
                return Ok(false);
            }
            st.writing = Arc::new(std::mem::take(&mut st.dirty));
            (st.writing.clone(), remove, st.journal.next_chunk())
        };
        let result = self.write_notes(&notes, &old, first, &remove);
        let mut st = self.lock();
        let writing = std::mem::take(&mut st.writing);
        if result.is_err() {
            // Nothing is lost from memory: note everything again (unless changed since) for the next write-out.
            for (id, kind) in notes.iter() {
                st.dirty.entry(id.clone()).or_insert(*kind);
            }
        }
        drop(st);
        // The notes are freed outside the lock.
        drop((writing, notes));
        result?;
        let st = self.lock();
        // Chunks this write-out emptied go at once. sled recovers a prefix of its log, so this removal never
        // survives a crash without the writes that emptied them.
        let emptied = st.journal.to_remove(&[]);
        drop(st);
        if !emptied.is_empty() {
            self.disk.apply(&[], &emptied)?;
            self.lock().journal.remove_chunks(&emptied);
        }
        Ok(true)
    }

    /// Writes the records `notes` name (and moves the current records out of the chunks in `old`, which go
    /// with `remove`), then notes their new places. The state lock is taken a batch at a time, so requests
    /// never wait long for it; a record that changes between two batches is noted again and written by the next
    /// write-out too.
    fn write_notes(
        &self,
        notes: &Map<TaskId, Dirty>,
        old: &[(u64, sled::IVec)],
        first: u64,
        remove: &[u64],
    ) -> Result<(), StoreError> {
        let notes: Vec<(&TaskId, &Dirty)> = notes.iter().collect();
        let mut taken: Vec<Taken> = Vec::with_capacity(notes.len());
        for batch in notes.chunks(LOCK_BATCH) {
            let st = self.lock();
            taken.extend(batch.iter().filter_map(|(id, kind)| {
                let record = match kind {
                    Dirty::Put => match st.live.get(*id) {
                        Some(r) => Some((None, r.clone())),
                        None => Some(st.finished.get(*id).map(|(g, r)| (Some(*g), r.clone()))?),
                    },
                    // No record of it on disk: nothing to hide.
                    Dirty::Delete => {
                        st.journal.loc(id)?;
                        None
                    }
                };
                Some(((*id).clone(), record))
            }));
        }
        let mut copies: Vec<(&str, &[u8])> = Vec::new();
        if !old.is_empty() {
            let st = self.lock();
            for (number, bytes) in old {
                for entry in disk::entries(*number, bytes)? {
                    if let Entry::Put { id, loc, body } = entry {
                        if !st.writing.contains_key(id) && st.journal.is_current(id, loc) {
                            copies.push((id, body));
                        }
                    }
                }
            }
        }
        // Encoding is the costly part; it runs without the state lock, so requests go on meanwhile.
        let written = Self::encode(first, &copies, &taken)?;
        self.disk.apply(&written.chunks, remove)?;
        self.unflushed.store(true, Ordering::SeqCst);
        // Until the new places are noted, a reader may find a record's chunk gone (compacted); it then waits for
        // this write-out (see `Store::with_record`).
        {
            let mut st = self.lock();
            for chunk in &written.chunks {
                st.journal.add_chunk(chunk.number, chunk.bytes.len() as u64, chunk.tombstones);
            }
        }
        for batch in written.puts.chunks(LOCK_BATCH) {
            let mut st = self.lock();
            for (id, loc) in batch {
                st.journal.set(id, *loc);
            }
        }
        for batch in written.tombstones.chunks(LOCK_BATCH) {
            let mut st = self.lock();
            for id in batch {
                st.journal.clear(id);
            }
        }
        // Finished records now on disk leave memory, unless they changed again meanwhile.
        for batch in taken.chunks(LOCK_BATCH) {
            let mut st = self.lock();
            for (id, record) in batch {
                if let Some((Some(generation), _)) = record {
                    if st.finished.get(id).is_some_and(|(g, _)| g == generation) {
                        st.finished.remove(id);
                    }
                }
            }
        }
        self.lock().journal.remove_chunks(remove);
        Ok(())
    }

    /// Builds the chunks of a write-out: records moved out of compacted chunks first, then the changes (so a
    /// change wins over a copy in recovery's last-entry-wins reading).
    fn encode(first: u64, copies: &[(&str, &[u8])], taken: &[Taken]) -> Result<Written, StoreError> {
        let mut writer = ChunkWriter::new(first);
        let mut puts = Vec::with_capacity(copies.len() + taken.len());
        let mut tombstones = Vec::new();
        for (id, body) in copies {
            puts.push((id.to_string(), writer.put_encoded(id, body)?));
        }
        for (id, record) in taken {
            match record {
                Some((_, record)) => puts.push((id.clone(), writer.put(record)?)),
                None => {
                    writer.delete(id)?;
                    tombstones.push(id.clone());
                }
            }
        }
        Ok(Written { chunks: writer.finish().0, puts, tombstones })
    }

    /// Writes out, and flushes if anything was written since the last flush (by this write-out or any other).
    /// A waiter whose change is already flushed costs nothing.
    fn persist(&self) -> Result<(), StoreError> {
        self.write_out()?;
        if self.unflushed.swap(false, Ordering::SeqCst) {
            let mark = self.lock().journal.next_chunk();
            if let Err(e) = self.disk.flush() {
                self.unflushed.store(true, Ordering::SeqCst);
                return Err(e);
            }
            let mut st = self.lock();
            st.durable_below = st.durable_below.max(mark);
        }
        Ok(())
    }
}

/// The broker's state: in-memory queues over a durable sled journal.
pub struct Store {
    core: Arc<Core>,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    id_counter: AtomicU64,
    flusher: flush::Flusher,
    /// Woken whenever a task becomes ready (enqueue, schedule due, retry due, lease lost, requeue).
    ready_notify: Notify,
    /// Woken whenever a task reaches a terminal state or disappears.
    finished_notify: Notify,
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir` and rebuilds the queues from it. Tasks that were leased
    /// when the daemon stopped go back to their queues. Must run inside a tokio runtime (the flusher is a task).
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        let options = StoreOptions::from(config);
        let core = Arc::new(Core {
            disk: Disk::open(config)?,
            state: Mutex::new(State::default()),
            write_lock: Mutex::new(()),
            unflushed: AtomicBool::new(false),
        });
        let persist = {
            let core = core.clone();
            move || core.persist().map_err(|e| e.to_string())
        };
        let store = Store {
            flusher: flush::Flusher::start(Arc::new(persist), options.fsync, options.fsync_interval),
            core,
            options,
            id_counter: AtomicU64::new(initial_counter(clock.now_ms())),
            clock,
            ready_notify: Notify::new(),
            finished_notify: Notify::new(),
        };
        store.recover()?;
        store.core.persist()?;
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

    /// Resolves once every change made before the call is durable under the fsync policy (at once under
    /// `interval`). Concurrent callers share one write-out and one flush.
    pub fn durable(&self) -> flush::Durable {
        self.flusher.request()
    }

    /// Shutdown: stops the flusher, writes out and flushes everything. The database closes when the last handle
    /// drops.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.flusher.stop().await;
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || core.persist())
            .await
            .map_err(|e| StoreError::Flush(format!("flush task failed: {e}")))?
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
        self.lock().journal.size()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }

    /// Reads the journal back: the last entry of each task wins. Rebuilds the queues, the finished tasks'
    /// index and the journal's account.
    fn recover(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let chunks = self.core.disk.chunks()?;
        let mut latest: Map<&str, (Loc, &[u8])> = Map::default();
        let mut st = self.lock();
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
            st.journal.add_chunk(*number, bytes.len() as u64, tombstones);
        }
        let mut records = Vec::with_capacity(latest.len());
        for (id, (loc, body)) in latest {
            st.journal.set(id, loc);
            records.push(disk::decode(id, body)?);
        }
        // FIFO within a priority is `seq` order, which the records keep.
        records.sort_by_key(|r| r.seq);
        let mut requeued = 0;
        for mut record in records {
            st.next_seq = st.next_seq.max(record.seq);
            if record.state.is_terminal() {
                let meta = DoneMeta::of(&record);
                st.expiry.insert((meta.expires_at_ms, record.id.clone()));
                st.add_dead(&record.id, &meta);
                st.done.insert(record.id, meta);
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
            st.live.insert(record.id.clone(), Arc::new(record));
        }
        st.next_lease_id = now.saturating_mul(1000);
        // What was read back is on disk.
        st.durable_below = st.journal.next_chunk();
        let (bytes, current) = st.journal.size();
        tracing::info!(
            live = st.live.len(),
            requeued,
            results = st.done.len(),
            journal_bytes = bytes,
            current_bytes = current,
            "store recovered"
        );
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
        Ok(())
    }

    /// Stores new tasks (or finds existing ones by id). All are validated before any is stored.
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
        let mut st = self.lock();
        for spec in specs {
            if let Some(id) = &spec.id {
                if let Some(state) = st.state_of(id) {
                    out.push(Enqueued { id: id.clone(), created: false, state });
                    continue;
                }
            }
            let id = spec.id.unwrap_or_else(|| self.new_id());
            let eta_ms = spec.eta_ms.or(spec.countdown_ms.map(|c| now.saturating_add(c))).filter(|eta| *eta > now);
            let seq = st.take_seq(now);
            let record = TaskRecord {
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
                seq,
                created_at_ms: now,
                eta_ms,
                // Not yet leased, run or finished.
                ..TaskRecord::default()
            };
            st.totals.enqueued += 1;
            if record.expires_at_ms.is_some_and(|e| e <= now) {
                // Expired on arrival: keep it findable, never run it.
                self.finish_revoked(&mut st, record, now, Some(expired_error()));
                out.push(Enqueued { id, created: true, state: TaskState::Revoked });
                continue;
            }
            match eta_ms {
                Some(eta) => {
                    st.scheduled.insert((eta, id.clone()), record.queue.clone());
                    st.queue(&record.queue).scheduled += 1;
                }
                None => {
                    st.queue(&record.queue).ready.insert(record.ready_key(), id.clone());
                    woke = true;
                }
            }
            out.push(Enqueued { id: id.clone(), created: true, state: record.state });
            st.touch(&id);
            st.live.insert(id, Arc::new(record));
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
    pub fn lease(&self, conn: ConnId, queues: &[String], max: usize, lease_ms: Option<u64>) -> (Vec<LeasedTask>, bool) {
        let now = self.now_ms();
        let mut out = Vec::new();
        let mut expired = false;
        let mut st = self.lock();
        for queue in queues {
            while out.len() < max {
                let Some(q) = st.queues.get_mut(queue.as_str()) else { break };
                let Some((_, id)) = q.ready.pop_first() else { break };
                let Some(record) = st.live.get_mut(&id) else { continue };
                if record.expires_at_ms.is_some_and(|e| e <= now) {
                    let record = st.take_live(&id).expect("live");
                    self.finish_revoked(&mut st, record, now, Some(expired_error()));
                    expired = true;
                    continue;
                }
                let lease_ms = lease_ms.unwrap_or(record.lease_ms).clamp(1, self.options.max_lease_ms);
                let record = Arc::make_mut(record);
                record.state = TaskState::Started;
                record.attempts += 1;
                record.started_at_ms = Some(now);
                let deadline_ms = now.saturating_add(lease_ms);
                let leased = LeasedTask {
                    id: id.clone(),
                    lease_id: 0,
                    queue: record.queue.clone(),
                    task: record.task.clone(),
                    args: record.args.clone(),
                    kwargs: record.kwargs.clone(),
                    context: record.context.clone(),
                    attempt: record.attempts,
                    max_retries: record.max_retries,
                    deadline_ms,
                    lease_ms,
                };
                // A lease is not written: it lives in memory, and a restart returns the task to its queue anyway.
                st.next_lease_id += 1;
                let lease_id = st.next_lease_id;
                st.leases.insert(
                    id.clone(),
                    LeaseEntry { lease_id, deadline_ms, lease_ms, conn, queue: leased.queue.clone() },
                );
                st.deadlines.insert((deadline_ms, id.clone()));
                st.by_conn.entry(conn).or_default().insert(id.clone());
                st.queue(queue).leased += 1;
                out.push(LeasedTask { lease_id, ..leased });
            }
        }
        let unflushed = out.iter().any(|task| {
            st.dirty.contains_key(&task.id)
                || st.writing.contains_key(&task.id)
                || st.journal.loc(&task.id).is_none_or(|loc| loc.chunk >= st.durable_below)
        });
        drop(st);
        if expired {
            self.finished_notify.notify_waiters();
        }
        (out, unflushed)
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
        record.state = TaskState::Success;
        record.result = Some(result);
        record.error = None;
        let ttl = record.result_ttl_ms;
        self.finish(&mut st, record, now, ttl);
        st.queue(&entry.queue).succeeded += 1;
        st.totals.succeeded += 1;
        drop(st);
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
        let mut st = self.lock();
        let (entry, mut record) = self.take_for_outcome(&mut st, id, lease_id, now)?;
        st.queue(&entry.queue).failed += 1;
        st.totals.failed += 1;
        record.error = Some(error);
        if retry && record.attempts <= record.max_retries {
            let retry_at = now.saturating_add(countdown_ms.unwrap_or_else(|| record.backoff_ms()));
            record.state = TaskState::Retry;
            self.schedule(&mut st, record, retry_at, now);
            st.totals.retried += 1;
            drop(st);
            self.ready_notify.notify_waiters();
            return Ok(FailOutcome { state: TaskState::Retry, retry_at_ms: Some(retry_at) });
        }
        self.bury(&mut st, record, now);
        drop(st);
        self.finished_notify.notify_waiters();
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
        st.deadlines.remove(&(old, id.to_string()));
        st.deadlines.insert((new, id.to_string()));
        Ok((new, revoked))
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
        if count {
            record.lease_losses += 1;
        }
        tracing::debug!(task = %id, why, losses = record.lease_losses, "lease lost");
        if record.revoked {
            return self.finish_revoked(st, record, now, None);
        }
        if record.lease_losses >= self.options.max_lease_losses {
            record.error = Some(TaskError {
                kind: "LeaseLost".into(),
                message: format!("lease lost {} times ({why}); giving up", record.lease_losses),
                traceback: None,
            });
            return self.bury(st, record, now);
        }
        self.return_to_queue(st, record, now)
    }

    /// Releases every lease held by a closed connection. `shutting_down`: the daemon is stopping, so the
    /// losses do not count towards `max_lease_losses`.
    pub fn release_connection(&self, conn: ConnId, shutting_down: bool) -> usize {
        let now = self.now_ms();
        let mut st = self.lock();
        let ids: Vec<TaskId> = st.by_conn.get(&conn).map(|s| s.iter().cloned().collect()).unwrap_or_default();
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
        Ok(())
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
        for _ in 0..8 {
            let loc = {
                let st = self.lock();
                if let Some(record) = st.record(id) {
                    return Ok(Some(f(record)));
                }
                if !st.done.contains_key(id) {
                    return Ok(None);
                }
                st.journal.loc(id).ok_or_else(|| StoreError::Corrupt {
                    id: id.to_string(),
                    message: "finished task with no record in memory or on disk".into(),
                })?
            };
            if let Some(record) = self.core.disk.read(id, loc)? {
                return Ok(Some(f(&record)));
            }
            // Its chunk was compacted by a write-out that has not moved its place yet: wait for that write-out.
            drop(self.core.write_lock.lock().unwrap_or_else(|p| p.into_inner()));
        }
        Err(StoreError::Flush(format!("the record of {id} kept moving while being read")))
    }

    /// Reads a task.
    pub fn get(&self, id: &str) -> Result<TaskInfo, StoreError> {
        self.with_record(id, TaskRecord::info)?.ok_or_else(|| StoreError::NotFound(id.to_string()))
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
            Arc::make_mut(record).revoked = true;
            st.touch(id);
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
        let mut ids: Vec<TaskId> = match st.queues.get_mut(queue) {
            Some(q) => std::mem::take(&mut q.ready).into_values().collect(),
            None => return 0,
        };
        let due: Vec<(u64, TaskId)> =
            st.scheduled.iter().filter(|(_, q)| q.as_str() == queue).map(|(k, _)| k.clone()).collect();
        for key in due {
            st.scheduled.remove(&key);
            decrement(&mut st.queue(queue).scheduled);
            ids.push(key.1);
        }
        for id in &ids {
            st.delete(id);
        }
        drop(st);
        self.finished_notify.notify_waiters();
        ids.len() as u64
    }

    /// Ids in the dead set: of one queue or all (`"*"` or `None`); per queue oldest failure first, queues in
    /// name order.
    fn dead_ids(&self, queue: Option<&str>, limit: usize) -> Vec<TaskId> {
        let st = self.lock();
        let sets: Vec<&BTreeSet<(u64, TaskId)>> = match queue {
            Some(q) if q != "*" => st.dead.get(q).into_iter().collect(),
            _ => st.dead.values().collect(),
        };
        sets.into_iter().flatten().take(limit).map(|(_, id)| id.clone()).collect()
    }

    /// Lists dead tasks: per queue, oldest failure first; queues in name order.
    pub fn dead_list(&self, queue: Option<&str>, limit: usize) -> Result<Vec<TaskInfo>, StoreError> {
        let mut out = Vec::new();
        for id in self.dead_ids(queue, limit) {
            if let Some(info) = self.with_record(&id, TaskRecord::info)? {
                if info.state == TaskState::Failure {
                    out.push(info);
                }
            }
        }
        Ok(out)
    }

    /// Puts dead tasks back in their queues as new tasks.
    pub fn dead_requeue(&self, request: &DeadRequeue) -> Result<u64, StoreError> {
        let mut ids = request.ids.clone();
        if let Some(queue) = &request.queue {
            ids.extend(self.dead_ids(Some(queue), usize::MAX));
        }
        let now = self.now_ms();
        let mut count = 0;
        for id in ids {
            let Some(mut record) = self.with_record(&id, TaskRecord::clone)? else { continue };
            let mut st = self.lock();
            // Still the same failure (nothing requeued or removed it meanwhile)?
            match st.done.get(&id) {
                Some(meta)
                    if meta.state == TaskState::Failure && Some(meta.finished_at_ms) == record.finished_at_ms => {}
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
            self.return_to_queue(&mut st, record, now);
            count += 1;
        }
        if count > 0 {
            self.ready_notify.notify_waiters();
        }
        Ok(count)
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
        st.retire(record);
    }

    fn finish_revoked(&self, st: &mut State, mut record: TaskRecord, now: u64, error: Option<TaskError>) {
        record.state = TaskState::Revoked;
        record.revoked = true;
        if error.is_some() {
            record.error = error;
        }
        st.totals.revoked += 1;
        let ttl = record.result_ttl_ms;
        self.finish(st, record, now, ttl)
    }

    /// Moves a task to the dead set (`FAILURE`).
    fn bury(&self, st: &mut State, mut record: TaskRecord, now: u64) {
        record.state = TaskState::Failure;
        st.totals.dead += 1;
        let ttl = self.options.dead_ttl_ms.max(record.result_ttl_ms);
        self.finish(st, record, now, ttl)
    }
}

fn expired_error() -> TaskError {
    TaskError { kind: "Expired".into(), message: "task expired before it started".into(), traceback: None }
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
