//! The checkpoint: sled brought up to date from the log's records, in the background.
//!
//! The log writer ([`super::commit`]) hands every round's notes to `Core::to_checkpoint` and, about once a
//! `checkpoint_interval_ms` (or when a segment grows past `checkpoint_log_bytes`), starts a new log segment and
//! asks for a checkpoint up to it. The checkpoint thread then appends the current record of every task noted
//! since the last checkpoint to the journal in sled ([`super::disk`]; a few chunks of about 6 KiB in one atomic
//! batch), marks that recovery may start at the new segment, flushes sled (and syncs its log and blob files),
//! and deletes the older segments. A task enqueued, run and finished between two checkpoints costs sled one
//! record. Records read from memory may be newer than the log's: harmless, since recovery replays the log on
//! top and the last entry of a task wins.
//!
//! Nothing on the reply path waits for a checkpoint. sled 0.34 can deadlock when batches are applied without a
//! flush after each (fixed upstream after 0.34.7), so a checkpoint applies one batch and flushes it; a checkpoint
//! running longer than [`STUCK_AFTER`] is reported by the maintenance tick.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Id;

use super::disk::{self, ChunkWriter, Entry};
use super::{wal, Core, Dirty, Map, StoreError, Taken, Written, LOCK_BATCH};

/// How many noted tasks one sled batch of a checkpoint carries at most (a few MiB of chunks).
const SLICE: usize = 16_384;

/// A checkpoint running longer than this is logged as stuck, every tick, until it ends.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// The checkpoint thread's loop: one checkpoint per segment number received, until the channel closes.
pub(super) fn run_checkpointer(core: Arc<Core>, requests: std::sync::mpsc::Receiver<u64>) {
    lower_priority();
    for segment in requests {
        if let Err(e) = core.checkpoint(segment) {
            tracing::error!(error = %e, segment, "checkpoint failed; the log keeps its segments until the next one");
        }
        // The segment the log writer moves to next, made ready now (it reuses the spare this checkpoint left).
        if let Err(e) = wal::prepare(&core.wal_dir, segment + 1) {
            tracing::warn!(error = %e, "could not prepare the next log segment; the log writer will create it");
        }
        *core.checkpoint_started.lock().unwrap_or_else(|p| p.into_inner()) = None;
        core.checkpointing.store(false, Ordering::SeqCst);
    }
}

/// Makes this thread yield the CPU to the request path: a checkpoint after a large backlog runs for seconds,
/// and on a small machine it would otherwise take the cores the replies need (the p999 latency).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain integer arguments; `gettid` names this thread, which `setpriority` accepts on Linux.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

impl Core {
    /// Asks the checkpoint thread for a checkpoint up to log segment `segment` (the log writer calls this once it
    /// has started that segment, and only while no checkpoint runs).
    pub(super) fn request_checkpoint(&self, segment: u64) {
        self.checkpointing.store(true, Ordering::SeqCst);
        *self.checkpoint_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        let sent =
            self.checkpoint_requests.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|tx| tx.send(segment));
        if !matches!(sent, Some(Ok(()))) {
            self.checkpointing.store(false, Ordering::SeqCst);
        }
    }

    /// Brings sled up to date with every change handed over so far, which covers every log segment before
    /// `segment`; then deletes those segments.
    pub(super) fn checkpoint(&self, segment: u64) -> Result<(), StoreError> {
        self.write_out()?;
        {
            // A data directory rewrite swaps databases under the write lock: the mark goes to the one in use.
            let _order = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.disk.set_replay_from(segment)?;
        }
        self.disk.flush()?;
        let removed = wal::remove_before(&self.wal_dir, segment)?;
        self.checkpoints.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(segment, removed, "checkpoint done");
        Ok(())
    }

    /// Appends every change noted so far to the journal, and removes or compacts old chunks (not flushed).
    /// Returns whether anything was written.
    pub(super) fn write_out(&self) -> Result<bool, StoreError> {
        let _order = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let compact = self.journal().to_compact();
        // Only write-outs change the journal, and this one holds the write lock: read without the state lock.
        let mut old = Vec::with_capacity(compact.len());
        for number in &compact {
            if let Some(bytes) = self.disk.chunk(*number)? {
                old.push((*number, bytes));
            }
        }
        let (remove, first) = {
            let journal = self.journal();
            (journal.to_remove(&compact), journal.next_chunk())
        };
        let notes = std::mem::take(&mut *self.to_checkpoint());
        if notes.is_empty() && remove.is_empty() {
            return Ok(false);
        }
        let result = self.write_notes(&notes, &old, first, &remove);
        if result.is_err() {
            // Nothing is lost from memory: note everything again (unless changed since) for the next write-out.
            let mut to_checkpoint = self.to_checkpoint();
            for (id, kind) in notes.iter() {
                to_checkpoint.entry(id.clone()).or_insert(*kind);
            }
        }
        drop(notes);
        result?;
        // Chunks this write-out emptied go at once. sled recovers a prefix of its log, so this removal never
        // survives a crash without the writes that emptied them.
        let emptied = self.journal().to_remove(&[]);
        if !emptied.is_empty() {
            self.disk.apply(&[], &emptied)?;
            self.journal().remove_chunks(&emptied);
        }
        Ok(true)
    }

    /// Writes the records `notes` name (and moves the current records out of the chunks in `old`, which go
    /// with `remove`), then notes their new places. It goes a slice of [`SLICE`] notes at a time, each its own
    /// sled batch followed by a flush (sled 0.34 can deadlock when batches are applied without flushes between
    /// them), so a checkpoint after a large backlog never holds all of it encoded at once. The state lock is
    /// taken a batch at a time, so requests never wait long for it; a record that changes between two batches
    /// is noted again and written by the next write-out too.
    fn write_notes(
        &self,
        notes: &Map<Id, Dirty>,
        old: &[(u64, sled::IVec)],
        first: u64,
        remove: &[u64],
    ) -> Result<(), StoreError> {
        let notes: Vec<(&Id, &Dirty)> = notes.iter().collect();
        let slices: Vec<&[(&Id, &Dirty)]> =
            if notes.is_empty() { vec![&notes[..]] } else { notes.chunks(SLICE).collect() };
        let mut next_chunk = first;
        for (i, slice) in slices.iter().enumerate() {
            let (copies_from, removing) = if i == 0 { (old, remove) } else { (&[][..], &[][..]) };
            if i > 0 {
                self.disk.flush()?;
            }
            next_chunk = self.write_slice(slice, copies_from, next_chunk, removing)?;
        }
        self.journal().remove_chunks(remove);
        Ok(())
    }

    /// One slice of [`Core::write_notes`]; returns the number the next chunk gets.
    fn write_slice(
        &self,
        notes: &[(&Id, &Dirty)],
        old: &[(u64, sled::IVec)],
        first: u64,
        remove: &[u64],
    ) -> Result<u64, StoreError> {
        let mut taken: Vec<Taken> = Vec::with_capacity(notes.len());
        for batch in notes.chunks(LOCK_BATCH) {
            // Only checkpoints change the journal's account, so it can be read apart from the state.
            let on_disk: Vec<bool> = {
                let journal = self.journal();
                batch.iter().map(|(id, _)| journal.loc(id).is_some()).collect()
            };
            let st = self.lock();
            taken.extend(batch.iter().zip(on_disk).filter_map(|((id, kind), on_disk)| {
                let in_memory = match st.live.get(&**id) {
                    Some(r) => Some((None, r.clone())),
                    None => st.finished.get(&**id).map(|(g, r)| (Some(*g), r.clone())),
                };
                let record = match (kind, in_memory) {
                    (Dirty::Put, Some(record)) => Some(record),
                    // Gone since it was noted (its tombstone is on its way through the log): sled must not keep
                    // an older record of it.
                    (Dirty::Put, None) if !st.done.contains_key(&**id) && on_disk => None,
                    // Finished and written already, or never on disk: nothing to do.
                    (Dirty::Put, None) => return None,
                    // No record of it on disk: nothing to hide.
                    (Dirty::Delete, _) if !on_disk => return None,
                    (Dirty::Delete, _) => None,
                };
                Some(((*id).clone(), record))
            }));
        }
        let mut copies: Vec<(Id, &[u8])> = Vec::new();
        if !old.is_empty() {
            {
                let journal = self.journal();
                for (number, bytes) in old {
                    for entry in disk::entries(*number, bytes)? {
                        if let Entry::Put { id, loc, body } = entry {
                            if let Some(id) = journal.current(id, loc) {
                                copies.push((id.clone(), body));
                            }
                        }
                    }
                }
            }
            // An entry this slice writes for a task supersedes its copy in the same batch, so that copy need not
            // be written. Every other copy must be: a task whose note is in a later slice (or writes nothing, being
            // in sled already) would otherwise have no record in sled between this slice's removal of its old
            // chunk and its own slice, or ever. Recovery keeps the last entry, and later slices come later.
            let written: std::collections::HashSet<&str> = taken.iter().map(|(id, _)| &**id).collect();
            copies.retain(|(id, _)| !written.contains(&**id));
        }
        // Encoding is the costly part; it runs without the state lock, so requests go on meanwhile.
        let (written, next_chunk) = Self::encode(first, &copies, &taken)?;
        drop(copies);
        self.disk.apply(&written.chunks, remove)?;
        // Until the new places are noted, a reader may find a record's chunk gone (compacted); it then looks again
        // a moment later (see `Store::with_record`).
        {
            let mut journal = self.journal();
            for chunk in &written.chunks {
                journal.add_chunk(chunk.number, chunk.bytes.len() as u64, chunk.tombstones);
            }
        }
        drop(written.chunks);
        for batch in written.puts.chunks(LOCK_BATCH) {
            let mut journal = self.journal();
            for (id, loc) in batch {
                journal.set(id, *loc);
            }
        }
        for batch in written.tombstones.chunks(LOCK_BATCH) {
            let mut journal = self.journal();
            for id in batch {
                journal.clear(id);
            }
        }
        // Finished records now on disk leave memory, unless they changed again meanwhile, or the log has not
        // written them yet (the log writer reads them from memory).
        for batch in taken.chunks(LOCK_BATCH) {
            let mut st = self.lock();
            for (id, record) in batch {
                if let Some((Some(generation), _)) = record {
                    let logged = !st.to_log.contains_key(id) && !st.logging.contains_key(id);
                    if logged && st.finished.get(id).is_some_and(|(g, _)| g == generation) {
                        st.finished.remove(id);
                    }
                }
            }
        }
        Ok(next_chunk)
    }

    /// Builds the chunks of a write-out: records moved out of compacted chunks first, then the changes (so a
    /// change wins over a copy in recovery's last-entry-wins reading).
    fn encode(first: u64, copies: &[(Id, &[u8])], taken: &[Taken]) -> Result<(Written, u64), StoreError> {
        let mut writer = ChunkWriter::new(first);
        let mut puts = Vec::with_capacity(copies.len() + taken.len());
        let mut tombstones = Vec::new();
        for (id, body) in copies {
            puts.push((id.clone(), writer.put_encoded(id, body)?));
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
        let (chunks, next) = writer.finish();
        Ok((Written { chunks, puts, tombstones }, next))
    }
}
