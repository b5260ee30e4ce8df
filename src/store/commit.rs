//! The commit path: the log writer thread, and the tickets replies wait on.
//!
//! Operations change memory and note the tasks they changed (`State::to_log`). The log writer, one thread that
//! owns the open segment ([`super::wal`]), runs rounds: it takes every note made since the last round (under
//! the state lock, numbering the round), encodes the current record of each noted task outside the lock, appends
//! them with one `write`, and, under `fsync = "always"`, makes them durable with one `fdatasync`; then it
//! publishes the round's number. A reply that must be durable holds a [`Durable`] ticket naming the round that
//! covers its change, and goes out once that round is published. Changes made while a round is being written wait
//! for the next one, which starts as soon as this one ends: group commit.
//!
//! Under `always` a round runs when a ticket asks for it, and every `fsync_interval_ms` for changes nobody waits
//! for (schedules coming due, say). Under `interval` a round runs as soon as anything is noted (so a `kill -9`
//! of the daemon loses at most what the kernel had not been handed yet) and `fdatasync` runs every
//! `fsync_interval_ms`, as Redis's `appendfsync everysec` does; replies never wait.
//!
//! After each round the writer hands its notes on to the checkpoint (`Core::to_checkpoint`), and from time to
//! time it starts a new segment and asks the checkpoint thread ([`super::checkpoint`]) to bring sled up to date
//! with everything before it. Nothing here waits for a checkpoint.
//!
//! A failed write or sync leaves the log in an unknown state, so the log stops: every ticket from then on fails
//! (replies report `internal`), and the daemon must be restarted. Notes are still handed to the checkpoint, which
//! then writes everything in memory to sled every `checkpoint_interval_ms` and drops the log up to the failed
//! segment, so memory does not grow without bound and a restart finds sled complete.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::wal::{LogBatch, Wal};
use super::Id;
use super::{Core, Dirty, Map, StoreError, LOCK_BATCH};
use crate::config::FsyncPolicy;

/// What the log writer has made durable.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every round up to this one is durable.
    pub durable: u64,
    /// Set once a write or sync failed: nothing is durable from then on.
    pub failed: Option<Arc<str>>,
}

/// Resolves when the changes it was taken for are durable; an `Err` means they may not be, and the caller must
/// not report success.
pub struct Durable(Ticket);

enum Ticket {
    Ready,
    Wait { progress: watch::Receiver<Progress>, round: u64 },
}

impl Durable {
    /// A ticket that is resolved already.
    pub(crate) fn ready() -> Durable {
        Durable(Ticket::Ready)
    }

    /// A ticket that resolves once round `round` is durable.
    pub(crate) fn after(progress: watch::Receiver<Progress>, round: u64) -> Durable {
        Durable(Ticket::Wait { progress, round })
    }

    /// Waits for it.
    pub async fn wait(self) -> Result<(), String> {
        let Ticket::Wait { mut progress, round } = self.0 else { return Ok(()) };
        let result = progress.wait_for(|p| p.durable >= round || p.failed.is_some()).await;
        match result {
            Ok(p) if p.durable >= round => Ok(()),
            Ok(p) => Err(format!("the write-ahead log failed: {}", p.failed.as_deref().unwrap_or("?"))),
            Err(_) => Err("the log writer stopped".to_string()),
        }
    }
}

impl std::future::IntoFuture for Durable {
    type Output = Result<(), String>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// Under `interval`, how often a busy log writer looks for changes (so a `kill -9` loses about this much).
const BUSY_POLL: Duration = Duration::from_millis(1);

/// How the log writer paces itself, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Flush policy.
    pub policy: FsyncPolicy,
    /// `fsync_interval_ms`.
    pub interval: Duration,
    /// Start a new segment (and a checkpoint) at least this often while records are written.
    pub checkpoint_every: Duration,
    /// ... or once the segment holds this many bytes.
    pub checkpoint_bytes: u64,
}

/// The log writer's loop. Returns when the store asks it to stop, after a last round and sync.
pub(super) fn run_log_writer(core: Arc<Core>, mut wal: Wal, pacing: Pacing) {
    let always = pacing.policy == FsyncPolicy::Always;
    let mut batch = LogBatch::default();
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let mut last_rotation = Instant::now();
    let mut failed = false;
    // The next round nobody asked for (under `always`: changes no reply waits for).
    let mut periodic = Instant::now() + pacing.interval;
    // Under `interval`, while changes keep coming: when to look for more. Polling then costs one wake-up per
    // `BUSY_POLL` instead of one per change; once a look finds nothing, the writer sleeps until the next change
    // rings it (`State::writer_asleep`).
    let mut next_poll: Option<Instant> = None;
    loop {
        let mut st = core.lock();
        loop {
            let now = Instant::now();
            let noted = !st.to_log.is_empty();
            if !always && !noted && next_poll.is_some_and(|p| now >= p) {
                next_poll = None;
            }
            let due = if always { now >= periodic } else { next_poll.is_none_or(|p| now >= p) };
            let go = core.stopping.load(Ordering::SeqCst)
                || st.wanted > st.rounds_taken
                || (noted && due)
                || (!failed && unsynced && now >= last_sync + pacing.interval)
                || (!failed && checkpoint_due(&core, &wal, last_rotation, &pacing))
                || (failed && failed_checkpoint_due(&core, last_rotation, &pacing));
            if go {
                break;
            }
            if !noted && now >= periodic {
                periodic = now + pacing.interval;
            }
            let mut until = if unsynced { periodic.min(last_sync + pacing.interval) } else { periodic };
            if wal.has_records() && !core.checkpointing.load(Ordering::SeqCst) {
                until = until.min(last_rotation + pacing.checkpoint_every);
            }
            if let Some(poll) = next_poll {
                until = until.min(poll);
            }
            st.writer_asleep = !always && next_poll.is_none();
            let timeout = until.saturating_duration_since(now).max(Duration::from_micros(100));
            st = core.log_wake.wait_timeout(st, timeout).unwrap_or_else(|p| p.into_inner()).0;
        }
        st.writer_asleep = false;
        if !always && !st.to_log.is_empty() {
            next_poll = Some(Instant::now() + BUSY_POLL);
        }
        periodic = Instant::now() + pacing.interval;
        let stopping = core.stopping.load(Ordering::SeqCst);
        let notes = Arc::new(std::mem::take(&mut st.to_log));
        st.rounds_taken += 1;
        let round = st.rounds_taken;
        st.logging = notes.clone();
        drop(st);

        let round_started = Instant::now();
        if !failed && !notes.is_empty() {
            if let Err(e) = write_round(&core, &notes, &mut batch, &mut wal) {
                fail(&core, &mut failed, e);
            } else {
                unsynced = true;
            }
        }
        if !failed && unsynced && (always || stopping || last_sync.elapsed() >= pacing.interval) {
            match wal.sync() {
                Ok(()) => {
                    unsynced = false;
                    last_sync = Instant::now();
                }
                Err(e) => {
                    unsynced = false;
                    fail(&core, &mut failed, e);
                }
            }
        }
        if !notes.is_empty() {
            core.metrics.commit(round_started.elapsed().as_secs_f64(), notes.len());
        }
        // The round is durable (or never will be): a lease of its tasks need not wait, and its tickets resolve.
        core.lock().logging = Arc::default();
        if !failed && !unsynced {
            core.progress.send_modify(|p| p.durable = p.durable.max(round));
        }
        hand_to_checkpoint(&core, notes);

        if failed && failed_checkpoint_due(&core, last_rotation, &pacing) {
            // The log is of no use any more: sled gets everything in memory, and the log up to now goes.
            last_rotation = Instant::now();
            core.request_checkpoint(wal.number() + 1);
        }
        if !failed && checkpoint_due(&core, &wal, last_rotation, &pacing) {
            match wal.rotate() {
                Ok(segment) => {
                    last_rotation = Instant::now();
                    unsynced = false;
                    last_sync = Instant::now();
                    core.request_checkpoint(segment);
                }
                Err(e) => fail(&core, &mut failed, e),
            }
        }
        if stopping && core.lock().to_log.is_empty() {
            return;
        }
    }
}

/// Whether to start a new segment and a checkpoint: the segment holds records, no checkpoint runs, and it is
/// time or the segment is large.
fn checkpoint_due(core: &Core, wal: &Wal, last_rotation: Instant, pacing: &Pacing) -> bool {
    wal.has_records()
        && !core.checkpointing.load(Ordering::SeqCst)
        && (last_rotation.elapsed() >= pacing.checkpoint_every || wal.size() >= pacing.checkpoint_bytes)
}

/// Once the log has failed: whether to checkpoint everything into sled again.
fn failed_checkpoint_due(core: &Core, last_checkpoint: Instant, pacing: &Pacing) -> bool {
    !core.checkpointing.load(Ordering::SeqCst) && last_checkpoint.elapsed() >= pacing.checkpoint_every
}

fn fail(core: &Core, failed: &mut bool, e: StoreError) {
    tracing::error!(error = %e, "the write-ahead log failed; durable replies fail until the daemon restarts");
    *failed = true;
    let message: Arc<str> = e.to_string().into();
    core.progress.send_modify(|p| p.failed = Some(message));
}

/// Encodes the current record of every noted task (reading them a batch at a time under the state lock) and
/// appends them to the log.
fn write_round(core: &Core, notes: &Map<Id, Dirty>, batch: &mut LogBatch, wal: &mut Wal) -> Result<(), StoreError> {
    batch.clear(wal.number());
    let notes: Vec<(&Id, &Dirty)> = notes.iter().collect();
    let mut taken = Vec::with_capacity(LOCK_BATCH);
    for chunk in notes.chunks(LOCK_BATCH) {
        {
            let st = core.lock();
            taken.extend(chunk.iter().filter_map(|(id, kind)| {
                let record = st.live.get(&**id).or_else(|| st.finished.get(&**id).map(|(_, r)| r));
                match (kind, record) {
                    (Dirty::Put, Some(record)) => Some((*id, Some(record.clone()))),
                    // Deleted since it was noted: the tombstone is its current state.
                    (Dirty::Put, None) if !st.done.contains_key(&**id) => Some((*id, None)),
                    // A finished task stays in memory until it is logged (see the checkpoint), so this is never
                    // reached; if it were, a tombstone would hide a record sled has.
                    (Dirty::Put, None) => {
                        tracing::warn!(task = %id, "a noted task is not in memory; not logged");
                        None
                    }
                    (Dirty::Delete, _) => Some((*id, None)),
                }
            }));
        }
        for (id, record) in taken.drain(..) {
            match record {
                Some(record) => batch.put(&record)?,
                None => batch.delete(id)?,
            }
        }
    }
    batch.end_round()?;
    wal.append(batch.bytes())
}

/// Passes a round's notes to the checkpoint (under its own lock: requests never wait for it, even while its
/// map grows).
fn hand_to_checkpoint(core: &Core, notes: Arc<Map<Id, Dirty>>) {
    let notes = Arc::try_unwrap(notes).unwrap_or_else(|shared| (*shared).clone());
    let mut to_checkpoint = core.to_checkpoint();
    if to_checkpoint.is_empty() {
        *to_checkpoint = notes;
    } else {
        to_checkpoint.extend(notes);
    }
}
