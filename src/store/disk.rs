//! The sled side of the store: the trees, their key layout (see [`super::keys`]), and the crash-safe order in
//! which a batch of changes is applied. Nothing else in the daemon touches sled.
//!
//! Crash safety without multi-tree transactions: sled recovers a prefix of its log, and [`Disk::apply`] writes
//! index insertions first, then the records, then index removals. So after any crash an index may point at a
//! record that says otherwise (an `active` id whose record is terminal, an `expiry` or `dead` key whose record
//! has moved on) but never the reverse; the record is the truth, and stale index entries are ignored and
//! cleaned when found.

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
    tasks: sled::Tree,
    active: sled::Tree,
    expiry: sled::Tree,
    dead: sled::Tree,
}

/// Changes to apply to sled in one go, already encoded.
#[derive(Default)]
pub struct WriteSet {
    /// Records to write (`Some`) or delete (`None`).
    pub records: Vec<(TaskId, Option<Vec<u8>>)>,
    /// Ids entering the `active` index.
    pub active_insert: Vec<TaskId>,
    /// Ids leaving the `active` index.
    pub active_remove: Vec<TaskId>,
    /// `expiry` keys to add.
    pub expiry_insert: Vec<Vec<u8>>,
    /// `expiry` keys to remove.
    pub expiry_remove: Vec<Vec<u8>>,
    /// `dead` keys to add.
    pub dead_insert: Vec<Vec<u8>>,
    /// `dead` keys to remove.
    pub dead_remove: Vec<Vec<u8>>,
}

impl WriteSet {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.active_insert.is_empty()
            && self.active_remove.is_empty()
            && self.expiry_insert.is_empty()
            && self.expiry_remove.is_empty()
            && self.dead_insert.is_empty()
            && self.dead_remove.is_empty()
    }
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

/// Encodes a record for the `tasks` tree.
pub fn encode(record: &TaskRecord) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(record).map_err(|e| StoreError::Corrupt { id: record.id.clone(), message: e.to_string() })
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
            tasks: db.open_tree("tasks")?,
            active: db.open_tree("active")?,
            expiry: db.open_tree("expiry")?,
            dead: db.open_tree("dead")?,
            db,
        })
    }

    /// Reads a record.
    pub fn load(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        match self.tasks.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => rmp_serde::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() }),
        }
    }

    /// Applies a write set: index insertions, then records, then index removals.
    pub fn apply(&self, set: &WriteSet) -> Result<(), StoreError> {
        apply_keys(&self.active, &set.active_insert, true)?;
        apply_keys(&self.expiry, &set.expiry_insert, true)?;
        apply_keys(&self.dead, &set.dead_insert, true)?;
        if !set.records.is_empty() {
            let mut batch = sled::Batch::default();
            for (id, bytes) in &set.records {
                match bytes {
                    Some(bytes) => batch.insert(id.as_bytes(), bytes.as_slice()),
                    None => batch.remove(id.as_bytes()),
                }
            }
            self.tasks.apply_batch(batch)?;
        }
        apply_keys(&self.active, &set.active_remove, false)?;
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

    /// The ids in the `active` index.
    pub fn active_ids(&self) -> Result<Vec<TaskId>, StoreError> {
        let mut ids = Vec::new();
        for entry in self.active.iter() {
            let (key, _) = entry?;
            ids.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(ids)
    }

    /// How many records there are (a full scan: startup only).
    pub fn count_records(&self) -> u64 {
        self.tasks.len() as u64
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
