//! The sled side of the store: the trees, their key layout (see [`super::keys`]), and the crash-safe order in
//! which a batch of changes is applied. Nothing else in the daemon touches sled.
//!
//! Trees: `live` (id → record of a task not yet finished), `done` (id → record of a finished task, kept until
//! its result expires), `expiry` and `dead` (indexes, see [`super::keys`]). A task is in one of `live` and `done`;
//! finishing moves it from the first to the second, a requeue from the dead set moves it back.
//!
//! Crash safety without multi-tree transactions: sled recovers a prefix of its log, and [`Disk::apply`] writes
//! index insertions first, then `done` records, then `live` records, then removals. A crash between two of these
//! steps can leave a task in both `live` and `done`; recovery keeps the copy with the higher `seq` (a requeue
//! renews `seq`; finishing keeps it, so on a tie `done` wins). An index key may outlive what it pointed at, never
//! the reverse; stale keys are ignored and cleaned when found.

use broker_client::proto::TaskId;

use super::keys;
use super::record::TaskRecord;
use super::StoreError;
use crate::config::Config;

/// The sled database and its trees.
pub struct Disk {
    db: sled::Db,
    /// sled's log file, opened a second time: on Linux sled makes its writes stable with `sync_file_range`,
    /// which neither flushes the drive's write cache nor the file's size, so [`Disk::flush`] adds an
    /// `fdatasync` of its own. Without it an acknowledged write survives `kill -9` but not a power loss.
    log_file: std::fs::File,
    live: sled::Tree,
    done: sled::Tree,
    expiry: sled::Tree,
    dead: sled::Tree,
}

/// Changes to apply to sled in one go, records already encoded.
#[derive(Default)]
pub struct WriteSet {
    /// Records of non-terminal tasks to write.
    pub live_put: Vec<(TaskId, Vec<u8>)>,
    /// Tasks leaving the `live` tree.
    pub live_remove: Vec<TaskId>,
    /// Records of terminal tasks to write.
    pub done_put: Vec<(TaskId, Vec<u8>)>,
    /// Tasks leaving the `done` tree.
    pub done_remove: Vec<TaskId>,
    /// `expiry` keys to add.
    pub expiry_insert: Vec<Vec<u8>>,
    /// `expiry` keys to remove.
    pub expiry_remove: Vec<Vec<u8>>,
    /// `dead` keys to add.
    pub dead_insert: Vec<Vec<u8>>,
    /// `dead` keys to remove.
    pub dead_remove: Vec<Vec<u8>>,
}

fn apply_keys<K: AsRef<[u8]>>(tree: &sled::Tree, keys: &[K], insert: bool) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for key in keys {
        if insert {
            batch.insert(key.as_ref(), &[]);
        } else {
            batch.remove(key.as_ref());
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

fn put_records(tree: &sled::Tree, records: &[(TaskId, Vec<u8>)]) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for (id, bytes) in records {
        batch.insert(id.as_bytes(), bytes.as_slice());
    }
    tree.apply_batch(batch)?;
    Ok(())
}

fn decode(id: &str, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() })
}

/// Encodes a record for the `live` or `done` tree, as a MessagePack array in field order: half the bytes of a
/// map with field names, which matters because sled copies whole leaf nodes on every write. Decoding accepts
/// both forms; a field added later goes at the end of [`TaskRecord`] with `#[serde(default)]`, so older,
/// shorter records still decode.
pub fn encode(record: &TaskRecord) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec(record).map_err(|e| StoreError::Corrupt { id: record.id.clone(), message: e.to_string() })
}

impl Disk {
    /// Opens the database in `config.data_dir`. sled's own timed flush is off: the store flushes.
    pub fn open(config: &Config) -> Result<Disk, StoreError> {
        let db = sled::Config::new()
            .path(&config.data_dir)
            .cache_capacity(config.cache_capacity_bytes)
            .flush_every_ms(None)
            .open()?;
        let log_path = config.data_dir.join("db");
        let log_file = std::fs::File::open(&log_path).map_err(|e| {
            StoreError::Flush(format!("cannot open sled's log file {} to sync it: {e}", log_path.display()))
        })?;
        Ok(Disk {
            log_file,
            live: db.open_tree("live")?,
            done: db.open_tree("done")?,
            expiry: db.open_tree("expiry")?,
            dead: db.open_tree("dead")?,
            db,
        })
    }

    /// Reads a finished task's record.
    pub fn load_done(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        match self.done.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode(id, &bytes).map(Some),
        }
    }

    /// Every record in the `live` tree (startup only).
    pub fn live_records(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.live.iter() {
            let (key, bytes) = entry?;
            records.push(decode(&String::from_utf8_lossy(&key), &bytes)?);
        }
        Ok(records)
    }

    /// Applies a write set in the crash-safe order (see the module doc).
    pub fn apply(&self, set: &WriteSet) -> Result<(), StoreError> {
        apply_keys(&self.expiry, &set.expiry_insert, true)?;
        apply_keys(&self.dead, &set.dead_insert, true)?;
        put_records(&self.done, &set.done_put)?;
        put_records(&self.live, &set.live_put)?;
        apply_keys(&self.live, &set.live_remove, false)?;
        apply_keys(&self.done, &set.done_remove, false)?;
        apply_keys(&self.expiry, &set.expiry_remove, false)?;
        apply_keys(&self.dead, &set.dead_remove, false)?;
        Ok(())
    }

    /// Makes everything applied so far durable: sled writes its buffers out, then the log file is fdatasync'ed.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log_file.sync_data().map_err(|e| StoreError::Flush(format!("fdatasync of sled's log: {e}")))?;
        Ok(())
    }

    /// How many finished tasks are kept (a full scan: startup only).
    pub fn count_done(&self) -> u64 {
        self.done.len() as u64
    }

    /// Up to `limit` `(queue, id, key)` entries of the dead set, of one queue or all (`"*"` or `None`).
    pub fn dead_entries(
        &self,
        queue: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, TaskId, Vec<u8>)>, StoreError> {
        let iter = match queue {
            Some(q) if q != "*" => self.dead.scan_prefix(keys::dead_prefix(q)),
            _ => self.dead.iter(),
        };
        let mut out = Vec::new();
        for entry in iter.take(limit) {
            let (key, _) = entry?;
            if let Some((queue, id)) = keys::parse_dead(&key) {
                out.push((queue, id, key.to_vec()));
            }
        }
        Ok(out)
    }

    /// Up to `limit` `expiry` entries due by `now`: `(key, expire-at, id)`.
    pub fn due_expiries(&self, now: u64, limit: usize) -> Result<Vec<(Vec<u8>, u64, TaskId)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.expiry.range(..keys::expiry(now.saturating_add(1), "")).take(limit) {
            let (key, _) = entry?;
            if let Some((at, id)) = keys::parse_expiry(&key) {
                out.push((key.to_vec(), at, id));
            }
        }
        Ok(out)
    }
}
