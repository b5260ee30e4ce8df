//! The sled side of the store: a journal of task records, and the crash-safe way it is written. Nothing else in
//! the daemon touches sled.
//!
//! One tree, `journal`: chunk number (u64, big-endian, so sled's order is write order) → chunk. A chunk is a
//! format byte ([`FORMAT`]) followed by entries:
//!
//! ```text
//! put:    0x01  id_len:u16 LE  id  body_len:u32 LE  body (the task's record, MessagePack)
//! delete: 0x02  id_len:u16 LE  id
//! ```
//!
//! A write-out appends the latest state of every task changed since the last one as new chunks, and removes
//! chunks nothing needs any more, in one atomic sled batch. Reading the journal in chunk order and keeping the
//! last entry of each id gives the state; a delete entry (a tombstone) hides the puts before it. So one write-out
//! costs a few sled inserts of about [`CHUNK_TARGET`] bytes, however many tasks changed, instead of one per
//! task and index key.
//!
//! Which chunks can go is decided by the store (see `Journal` in the parent module): a chunk none of whose puts
//! is current any more, and which holds no tombstone, can go at any time; one holding tombstones only once every
//! older chunk is gone (its tombstones may hide puts in them). A chunk that still holds current puts is
//! compacted by copying those into the next write-out, oldest chunk first, when the journal holds much more than
//! what is current.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use super::record::TaskRecord;
use super::StoreError;
use crate::config::Config;

/// The first byte of every chunk: the layout of what follows.
pub const FORMAT: u8 = 1;
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// The size a chunk is closed at (a larger record gets a chunk of its own). sled keeps up to 17 values in a
/// leaf node and writes a node larger than about 128 KiB (a quarter of its 512 KiB segment) as a file of its
/// own, so chunks stay well below 128 KiB / 17.
pub const CHUNK_TARGET: usize = 6 * 1024;

/// Where a record's body is: chunk number, byte offset and length within the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The chunk.
    pub chunk: u64,
    /// Offset of the body in the chunk.
    pub offset: u32,
    /// Length of the body.
    pub len: u32,
}

/// One entry of a chunk, borrowed from it.
#[derive(Debug)]
pub enum Entry<'a> {
    /// A task's record.
    Put {
        /// The task.
        id: &'a str,
        /// Where the body is.
        loc: Loc,
        /// The encoded record.
        body: &'a [u8],
    },
    /// A tombstone: the task is gone.
    Delete {
        /// The task.
        id: &'a str,
    },
}

fn corrupt(chunk: u64, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt { id: format!("journal chunk {chunk}"), message: message.into() }
}

/// Parses a chunk.
pub fn entries(chunk: u64, bytes: &[u8]) -> Result<Vec<Entry<'_>>, StoreError> {
    let (&format, _) = bytes.split_first().ok_or_else(|| corrupt(chunk, "empty chunk"))?;
    if format != FORMAT {
        return Err(corrupt(chunk, format!("unknown chunk format {format}")));
    }
    let mut at = 1usize;
    let mut out = Vec::new();
    let take = |at: &mut usize, n: usize| -> Result<&[u8], StoreError> {
        let slice = bytes.get(*at..*at + n).ok_or_else(|| corrupt(chunk, format!("truncated entry at byte {at}")))?;
        *at += n;
        Ok(slice)
    };
    while at < bytes.len() {
        let kind = take(&mut at, 1)?[0];
        let id_len = u16::from_le_bytes(take(&mut at, 2)?.try_into().expect("2 bytes")) as usize;
        let id = std::str::from_utf8(take(&mut at, id_len)?).map_err(|_| corrupt(chunk, "task id is not UTF-8"))?;
        match kind {
            PUT => {
                let len = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
                let offset = at as u32;
                let body = take(&mut at, len as usize)?;
                out.push(Entry::Put { id, loc: Loc { chunk, offset, len }, body });
            }
            DELETE => out.push(Entry::Delete { id }),
            other => return Err(corrupt(chunk, format!("unknown entry kind {other}"))),
        }
    }
    Ok(out)
}

/// Decodes a stored record.
pub fn decode(id: &str, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    TaskRecord::decode(bytes).map_err(|message| StoreError::Corrupt { id: id.to_string(), message })
}

/// Appends an entry's head (kind, id length, id).
fn write_head(out: &mut Vec<u8>, kind: u8, id: &str) -> Result<(), StoreError> {
    let id_len = u16::try_from(id.len())
        .map_err(|_| StoreError::Corrupt { id: id.to_string(), message: "task id too long to store".into() })?;
    out.push(kind);
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    Ok(())
}

/// Appends a put's body length and body, encoding the record.
fn write_body(out: &mut Vec<u8>, record: &TaskRecord) -> Result<(), StoreError> {
    let body_start = out.len();
    out.extend_from_slice(&[0; 4]);
    record.encode(out).map_err(|message| StoreError::Corrupt { id: record.id.to_string(), message })?;
    let len = u32::try_from(out.len() - body_start - 4)
        .map_err(|_| StoreError::Corrupt { id: record.id.to_string(), message: "record too large to store".into() })?;
    out[body_start..body_start + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Appends a one-entry chunk holding `record` (the payload of a log record, see [`super::wal`]).
pub fn write_put(out: &mut Vec<u8>, record: &TaskRecord) -> Result<(), StoreError> {
    out.push(FORMAT);
    write_head(out, PUT, &record.id)?;
    write_body(out, record)
}

/// Appends a one-entry chunk holding a tombstone for `id`.
pub fn write_delete(out: &mut Vec<u8>, id: &str) -> Result<(), StoreError> {
    out.push(FORMAT);
    write_head(out, DELETE, id)
}

/// A chunk closed by a [`ChunkWriter`], ready to be written.
#[derive(Debug)]
pub struct NewChunk {
    /// Its number.
    pub number: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// How many tombstones it holds.
    pub tombstones: u32,
}

/// Builds the chunks of one write-out.
///
/// A record is encoded as a MessagePack array in field order ([`TaskRecord::encode`]): half the bytes of a map
/// with field names. A field added to [`TaskRecord`] later goes at the end, so older, shorter records still
/// decode (decoding accepts the map form of the oldest data directories too).
pub struct ChunkWriter {
    number: u64,
    current: Vec<u8>,
    tombstones: u32,
    done: Vec<NewChunk>,
}

impl ChunkWriter {
    /// Starts at chunk `first`.
    pub fn new(first: u64) -> ChunkWriter {
        ChunkWriter { number: first, current: Vec::new(), tombstones: 0, done: Vec::new() }
    }

    fn seal(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.current);
        self.done.push(NewChunk { number: self.number, bytes, tombstones: std::mem::take(&mut self.tombstones) });
        self.number += 1;
    }

    /// Starts an entry: closes the chunk first if it is full.
    fn begin(&mut self, kind: u8, id: &str) -> Result<usize, StoreError> {
        if self.current.len() >= CHUNK_TARGET {
            self.seal();
        }
        if self.current.is_empty() {
            self.current.reserve(CHUNK_TARGET + CHUNK_TARGET / 2);
            self.current.push(FORMAT);
        }
        let start = self.current.len();
        write_head(&mut self.current, kind, id)?;
        Ok(start)
    }

    /// Finishes a put whose body (with its length) was appended from `body_start`: moves it to a chunk of its
    /// own if it made a shared chunk much larger than the target.
    fn end_put(&mut self, start: usize, body_start: usize) -> Result<Loc, StoreError> {
        let len32 = u32::try_from(self.current.len() - body_start - 4)
            .map_err(|_| StoreError::Corrupt { id: String::new(), message: "record too large to store".into() })?;
        let mut body_start = body_start;
        if start > 1 && self.current.len() > 2 * CHUNK_TARGET {
            let entry = self.current.split_off(start);
            self.seal();
            self.current.push(FORMAT);
            self.current.extend_from_slice(&entry);
            body_start = body_start - start + 1;
        }
        Ok(Loc { chunk: self.number, offset: (body_start + 4) as u32, len: len32 })
    }

    /// Appends a record; returns where its body is.
    pub fn put(&mut self, record: &TaskRecord) -> Result<Loc, StoreError> {
        let start = self.begin(PUT, &record.id)?;
        let body_start = self.current.len();
        write_body(&mut self.current, record)?;
        self.end_put(start, body_start)
    }

    /// Appends an already encoded record (one moved from an older chunk).
    pub fn put_encoded(&mut self, id: &str, body: &[u8]) -> Result<Loc, StoreError> {
        let start = self.begin(PUT, id)?;
        let body_start = self.current.len();
        let len = u32::try_from(body.len())
            .map_err(|_| StoreError::Corrupt { id: id.to_string(), message: "record too large to store".into() })?;
        self.current.extend_from_slice(&len.to_le_bytes());
        self.current.extend_from_slice(body);
        self.end_put(start, body_start)
    }

    /// Appends a tombstone; returns its chunk.
    pub fn delete(&mut self, id: &str) -> Result<u64, StoreError> {
        self.begin(DELETE, id)?;
        self.tombstones += 1;
        Ok(self.number)
    }

    /// The chunks written, and the number the next write-out starts at.
    pub fn finish(mut self) -> (Vec<NewChunk>, u64) {
        self.seal();
        (self.done, self.number)
    }
}

/// One sled database holding the journal.
struct Db {
    /// Its directory.
    path: PathBuf,
    db: sled::Db,
    /// sled's log file, opened a second time: on Linux sled makes its writes stable with `sync_file_range`,
    /// which neither flushes the drive's write cache nor the file's size, so [`Disk::flush`] adds an
    /// `fdatasync` of its own. Without it an acknowledged write survives `kill -9` but not a power loss.
    log_file: std::fs::File,
    journal: sled::Tree,
    /// Small facts about the data: the checkpoint mark ([`Disk::replay_from`]).
    meta: sled::Tree,
    /// Blob files (sled's home for values and nodes over about 128 KiB) already synced.
    synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

/// The key in `meta` of the first log segment a recovery must replay.
const REPLAY_FROM: &[u8] = b"wal_replay_from";

impl Db {
    fn open(path: &Path, cache_capacity: u64) -> Result<Db, StoreError> {
        let config = sled::Config::new().path(path).cache_capacity(cache_capacity).flush_every_ms(None);
        // A database closed a moment ago in this process (a restart in place) may still be held by one of sled's
        // background threads, which let go of its file lock shortly after: wait for that, a bounded time.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let log_path = path.join("db");
        let log_file = std::fs::File::open(&log_path).map_err(|e| {
            StoreError::Flush(format!("cannot open sled's log file {} to sync it: {e}", log_path.display()))
        })?;
        Ok(Db {
            path: path.to_path_buf(),
            journal: db.open_tree("journal")?,
            meta: db.open_tree("meta")?,
            db,
            log_file,
            synced_blobs: Mutex::new(Default::default()),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log_file.sync_data().map_err(|e| StoreError::Flush(format!("fdatasync of sled's log: {e}")))?;
        self.sync_blobs()?;
        Ok(())
    }

    /// Syncs the blob files not synced yet, and their directory. sled 0.34 writes a value or node over about
    /// 128 KiB to a file of its own under `blobs/` and never syncs it; its log then points at a file a power
    /// loss may take away. Returns how many files it synced.
    fn sync_blobs(&self) -> Result<usize, StoreError> {
        let dir = self.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("cannot list", &dir, e)),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = std::collections::HashSet::new();
        let mut count = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()).and_then(|f| f.sync_data()) {
                    Ok(()) => count += 1,
                    // sled removed it meanwhile (the value was replaced): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("cannot sync", &entry.path(), e)),
                }
            }
            present.insert(name);
        }
        if count > 0 {
            sync_dir(&dir)?;
        }
        *synced = present;
        Ok(count)
    }
}

/// The data directory: the sled database in use, which [`Disk::begin_rewrite`] can replace by a compact copy.
///
/// Layout: `CURRENT` names the database directory in use (`sled-N`). sled reuses the space of removed data but
/// never gives it back to the filesystem, so shrinking the directory means copying the journal into a new
/// database `sled-N+1`, flushing it, pointing `CURRENT` at it (write, fsync, rename: atomic), and removing the
/// old one. A crash before the rename leaves the old database in use; any `sled-*` directory `CURRENT` does not
/// name is removed at startup. A data directory from before this layout (sled's files at its top) is used in
/// place until its first rewrite.
pub struct Disk {
    root: PathBuf,
    cache_capacity: u64,
    current: RwLock<Db>,
    /// While a rewrite copies the journal: the batches applied meanwhile, to replay into the copy.
    rewrite_log: Mutex<Option<Vec<sled::Batch>>>,
}

/// The trees of the layout before the journal (one sled key per task and index entry).
const OLD_TREES: [&str; 4] = ["live", "done", "expiry", "dead"];
/// sled's files at the top of a data directory from before the `CURRENT` layout (and its `snap.*` files).
const TOP_LEVEL_SLED: [&str; 3] = ["conf", "db", "blobs"];

/// An I/O error on `path`, as a store error.
pub(super) fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Flush(format!("{what} {}: {e}", path.display()))
}

/// Syncs a directory, so the names created or removed in it are durable.
/// Creates the data directory readable by its owner only (0700), or narrows an existing one to that: it holds
/// every task's arguments and context, which other local users must not read. Files inside are then out of their
/// reach whatever their own modes.
fn private_dir(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| io_error("cannot create data dir", root, e))?;
    let mode = std::fs::metadata(root).map_err(|e| io_error("cannot read", root, e))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(|e| io_error("cannot restrict the permissions of", root, e))?;
        tracing::warn!(dir = %root.display(), from = format!("{mode:o}"), to = format!("{:o}", mode & 0o700),
            "the data dir was readable by other users: restricted to its owner");
    }
    Ok(())
}

pub(super) fn sync_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync directory", path, e))
}

impl Disk {
    /// Opens the database in use in `config.data_dir` (sled's own timed flush is off: the store flushes),
    /// moving the records of a data directory in the older per-task layout into the journal first.
    pub fn open(config: &Config) -> Result<Disk, StoreError> {
        let root = config.data_dir.clone();
        private_dir(&root)?;
        let pointer = root.join("CURRENT");
        let path = match std::fs::read_to_string(&pointer) {
            Ok(name) => root.join(name.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && root.join("conf").exists() => root.clone(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let path = root.join("sled-1");
                Self::point_at(&root, &path)?;
                path
            }
            Err(e) => return Err(io_error("cannot read", &pointer, e)),
        };
        // Leftovers of an interrupted rewrite: the database `CURRENT` no longer names.
        if path != root && root.join("conf").exists() {
            tracing::info!(dir = %root.display(), "removing the database the first rewrite replaced");
            Self::remove_top_level(&root).map_err(|e| io_error("cannot remove old files in", &root, e))?;
        }
        for entry in std::fs::read_dir(&root).map_err(|e| io_error("cannot list", &root, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("sled-") && entry.path() != path {
                tracing::info!(dir = %entry.path().display(), "removing an unused database directory");
                std::fs::remove_dir_all(entry.path()).map_err(|e| io_error("cannot remove", &entry.path(), e))?;
            }
        }
        let db = Db::open(&path, config.cache_capacity_bytes)?;
        let disk = Disk {
            root,
            cache_capacity: config.cache_capacity_bytes,
            current: RwLock::new(db),
            rewrite_log: Mutex::new(None),
        };
        disk.migrate()?;
        Ok(disk)
    }

    /// Makes `CURRENT` name `path`: written aside, synced, renamed over the old one, directory synced.
    fn point_at(root: &Path, path: &Path) -> Result<(), StoreError> {
        let name = path.file_name().expect("a sled-N directory").to_string_lossy().into_owned();
        let tmp = root.join("CURRENT.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, format!("{name}\n").as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, root.join("CURRENT"))
        };
        write().map_err(|e| io_error("cannot write", &root.join("CURRENT"), e))?;
        sync_dir(root)
    }

    fn db(&self) -> RwLockReadGuard<'_, Db> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the records of the per-task layout (trees `live` and `done`; a task found in both keeps the copy
    /// with the higher `seq`, the finished one on a tie) into the journal, then drops the old trees. A crash
    /// in between repeats the move at the next start, which appends the same records again: harmless.
    fn migrate(&self) -> Result<(), StoreError> {
        let db = self.db();
        let names = db.db.tree_names();
        if !OLD_TREES.iter().any(|t| names.iter().any(|n| n.as_ref() == t.as_bytes())) {
            return Ok(());
        }
        let mut records: std::collections::HashMap<super::Id, TaskRecord> = Default::default();
        for (tree, finished) in [("done", true), ("live", false)] {
            for entry in db.db.open_tree(tree)?.iter() {
                let (key, bytes) = entry?;
                let record = decode(&String::from_utf8_lossy(&key), &bytes)?;
                match records.get(&record.id) {
                    Some(done) if !finished && done.seq >= record.seq => {}
                    _ => {
                        records.insert(record.id.clone(), record);
                    }
                }
            }
        }
        drop(db);
        if !records.is_empty() {
            let first = self.last_chunk()?.map_or(0, |n| n + 1);
            let mut writer = ChunkWriter::new(first);
            for record in records.values() {
                writer.put(record)?;
            }
            self.apply(&writer.finish().0, &[])?;
            self.flush()?;
        }
        let db = self.db();
        for tree in OLD_TREES {
            db.db.drop_tree(tree)?;
        }
        db.flush()?;
        tracing::info!(records = records.len(), "moved the per-task trees of an older data directory into the journal");
        Ok(())
    }

    fn last_chunk(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.db().journal.last()?.and_then(|(key, _)| Some(u64::from_be_bytes(key.as_ref().try_into().ok()?))))
    }

    /// Every chunk, in order (startup).
    pub fn chunks(&self) -> Result<Vec<(u64, sled::IVec)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.db().journal.iter() {
            let (key, bytes) = entry?;
            let number = u64::from_be_bytes(
                key.as_ref().try_into().map_err(|_| corrupt(0, format!("bad journal key {:?}", key.as_ref())))?,
            );
            out.push((number, bytes));
        }
        Ok(out)
    }

    /// One chunk, if it is still there.
    pub fn chunk(&self, number: u64) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.db().journal.get(number.to_be_bytes())?)
    }

    /// Reads the record at `loc`; `None` if its chunk is gone (it was compacted since `loc` was read).
    pub fn read(&self, id: &str, loc: Loc) -> Result<Option<TaskRecord>, StoreError> {
        let Some(chunk) = self.chunk(loc.chunk)? else { return Ok(None) };
        let body = chunk
            .get(loc.offset as usize..loc.offset as usize + loc.len as usize)
            .ok_or_else(|| corrupt(loc.chunk, format!("record of {id} out of bounds")))?;
        let record = decode(id, body)?;
        if &*record.id != id {
            return Err(corrupt(loc.chunk, format!("record at {loc:?} is {}, not {id}", record.id)));
        }
        Ok(Some(record))
    }

    /// Writes new chunks and removes old ones, atomically.
    pub fn apply(&self, new: &[NewChunk], remove: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for chunk in new {
            batch.insert(&chunk.number.to_be_bytes(), chunk.bytes.as_slice());
        }
        for number in remove {
            batch.remove(&number.to_be_bytes());
        }
        let noted = self.noted().is_some().then(|| batch.clone());
        self.db().journal.apply_batch(batch)?;
        if let (Some(batch), Some(log)) = (noted, self.noted().as_mut()) {
            log.push(batch);
        }
        Ok(())
    }

    /// The first log segment a recovery must replay: everything in the segments before it is in the journal
    /// (0 when no checkpoint was ever marked).
    pub fn replay_from(&self) -> Result<u64, StoreError> {
        let mark = self.db().meta.get(REPLAY_FROM)?;
        Ok(mark.and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?))).unwrap_or(0))
    }

    /// Marks that the journal holds everything of the log segments before `segment`. Durable with the next
    /// [`Disk::flush`], and never before the chunks applied before it (sled recovers a prefix of its writes).
    pub fn set_replay_from(&self, segment: u64) -> Result<(), StoreError> {
        self.db().meta.insert(REPLAY_FROM, &segment.to_be_bytes())?;
        Ok(())
    }

    /// Makes everything applied so far durable: sled writes its buffers out, then the log file is fdatasync'ed.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db().flush()
    }

    /// Bytes sled's files take.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db().db.size_on_disk()?)
    }

    /// Removes sled's files from the top of a data directory of the layout before `CURRENT`.
    fn remove_top_level(root: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if TOP_LEVEL_SLED.contains(&name.as_str()) || name.starts_with("snap.") {
                if entry.path().is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                } else {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Starts copying the journal into a new database (see [`Disk`]): creates it, and from now on every
    /// [`Disk::apply`] is also noted, to be replayed into the copy. The caller holds off write-outs during this
    /// call and during [`Disk::finish_rewrite`], not in between, while [`Disk::copy_for_rewrite`] runs.
    pub fn begin_rewrite(&self) -> Result<Rewrite<'_>, StoreError> {
        let before = self.size_on_disk()?;
        let old_path = self.db().path.clone();
        let generation =
            old_path.file_name().and_then(|n| n.to_str()?.strip_prefix("sled-")?.parse::<u64>().ok()).unwrap_or(0);
        let path = self.root.join(format!("sled-{}", generation + 1));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| io_error("cannot remove", &path, e))?;
        }
        let new = Db::open(&path, self.cache_capacity)?;
        *self.noted() = Some(Vec::new());
        Ok(Rewrite { disk: self, new: Some(new), old_path, before })
    }

    fn noted(&self) -> MutexGuard<'_, Option<Vec<sled::Batch>>> {
        self.rewrite_log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies every chunk into the new database. Chunks are never changed once written, only added and
    /// removed, so a copy taken while write-outs go on, followed by the replay of what they did meanwhile, is
    /// exactly the journal.
    pub fn copy_for_rewrite(&self, rewrite: &Rewrite<'_>) -> Result<(), StoreError> {
        let new = rewrite.new.as_ref().expect("rewrite in progress");
        let chunks = self.db().journal.iter();
        let mut batch = sled::Batch::default();
        let mut batched = 0;
        for entry in chunks {
            let (key, value) = entry?;
            batch.insert(key, value);
            batched += 1;
            if batched == 256 {
                new.journal.apply_batch(std::mem::take(&mut batch))?;
                batched = 0;
            }
        }
        new.journal.apply_batch(batch)?;
        Ok(())
    }

    /// Replays the write-outs made during the copy, flushes the new database, points `CURRENT` at it, and
    /// removes the old one. Returns sled's size before and after.
    pub fn finish_rewrite(&self, mut rewrite: Rewrite<'_>) -> Result<(u64, u64), StoreError> {
        // Until `CURRENT` names the copy, a failure leaves the rewrite to its drop (which removes the copy).
        let noted = self.noted().take().unwrap_or_default();
        let new = rewrite.new.as_ref().expect("rewrite in progress");
        for batch in noted {
            new.journal.apply_batch(batch)?;
        }
        if let Some(mark) = self.db().meta.get(REPLAY_FROM)? {
            new.meta.insert(REPLAY_FROM, mark)?;
        }
        // The old database's writes not flushed yet are in the copy: flushing it covers them. sled does not sync
        // its directory; the copy's files must be there before `CURRENT` names it.
        new.flush()?;
        sync_dir(&new.path)?;
        if let Err(e) = Self::point_at(&self.root, &new.path) {
            // The rename may have happened even so. Pointing `CURRENT` back at the database in use settles which
            // one a restart opens; if even that fails, neither may be removed.
            let back = if rewrite.old_path == self.root {
                // The layout before `CURRENT`: no `CURRENT` means the database at the top.
                std::fs::remove_file(self.root.join("CURRENT"))
                    .map_err(|e| io_error("cannot remove", &self.root.join("CURRENT"), e))
                    .and_then(|()| sync_dir(&self.root))
            } else {
                Self::point_at(&self.root, &rewrite.old_path)
            };
            if let Err(back) = back {
                tracing::error!(error = %back, "could not settle CURRENT after a failed switch; keeping both databases");
                rewrite.new.take();
            }
            return Err(e);
        }
        let new = rewrite.new.take().expect("rewrite in progress");
        let old = std::mem::replace(&mut *self.current.write().unwrap_or_else(|p| p.into_inner()), new);
        drop(old);
        let old_path = &rewrite.old_path;
        let removed =
            if *old_path == self.root { Self::remove_top_level(&self.root) } else { std::fs::remove_dir_all(old_path) };
        if let Err(e) = removed {
            tracing::warn!(dir = %old_path.display(), error = %e, "could not remove the old database");
        }
        Ok((rewrite.before, self.size_on_disk()?))
    }
}

/// A rewrite of the data directory in progress (see [`Disk::begin_rewrite`]). Dropped unfinished (its copy
/// failed), it stops noting write-outs and removes the unfinished copy.
pub struct Rewrite<'a> {
    disk: &'a Disk,
    new: Option<Db>,
    old_path: PathBuf,
    before: u64,
}

impl Drop for Rewrite<'_> {
    fn drop(&mut self) {
        if let Some(new) = self.new.take() {
            *self.disk.noted() = None;
            let path = new.path.clone();
            drop(new);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove an unfinished copy");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(payload: usize) -> Vec<u8> {
        rmp_serde::to_vec(&["x".repeat(payload)]).unwrap()
    }

    fn record(id: &str, payload: usize) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            queue: "q".into(),
            task: "t".into(),
            payload: super::super::Payload::from_parts(Some(&args(payload)), None, None).unwrap(),
            ..TaskRecord::default()
        }
    }

    #[test]
    fn chunks_round_trip_and_split_at_the_target() {
        let mut writer = ChunkWriter::new(7);
        let mut locs = Vec::new();
        for i in 0..100 {
            locs.push((format!("id{i}"), writer.put(&record(&format!("id{i}"), 100)).unwrap()));
        }
        let big = writer.put(&record("big", 3 * CHUNK_TARGET)).unwrap();
        let tomb = writer.delete("id3").unwrap();
        let moved = writer
            .put_encoded("copy", &{
                let mut body = Vec::new();
                record("copy", 5).encode(&mut body).unwrap();
                body
            })
            .unwrap();
        let (chunks, next) = writer.finish();
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        assert_eq!(chunks[0].number, 7);
        assert_eq!(next, chunks.last().unwrap().number + 1);
        assert!(chunks.iter().filter(|c| c.bytes.len() <= 2 * CHUNK_TARGET).count() >= chunks.len() - 1);
        assert_eq!(chunks.iter().map(|c| c.tombstones).sum::<u32>(), 1);
        let find = |n: u64| &chunks.iter().find(|c| c.number == n).unwrap().bytes;
        for (id, loc) in locs.iter().chain([("big".to_string(), big), ("copy".to_string(), moved)].iter()) {
            let bytes = find(loc.chunk);
            let body = &bytes[loc.offset as usize..(loc.offset + loc.len) as usize];
            assert_eq!(&*decode(id, body).unwrap().id, id.as_str());
            let listed = entries(loc.chunk, bytes).unwrap();
            assert!(listed.iter().any(|e| matches!(e, Entry::Put { id: i, loc: l, .. } if i == id && l == loc)));
        }
        assert!(entries(tomb, find(tomb)).unwrap().iter().any(|e| matches!(e, Entry::Delete { id: "id3" })));
    }

    #[test]
    fn bad_chunks_are_errors_not_panics() {
        for bytes in
            [&b""[..], &[9], &[FORMAT, PUT, 5, 0, b'a'], &[FORMAT, 7, 0, 0], &[FORMAT, PUT, 1, 0, b'a', 9, 0, 0, 0]]
        {
            assert!(entries(1, bytes).is_err(), "{bytes:?}");
        }
    }

    fn chunk(number: u64) -> NewChunk {
        let mut writer = ChunkWriter::new(number);
        writer.put(&record(&format!("task{number}"), 10)).unwrap();
        writer.finish().0.pop().unwrap()
    }

    fn numbers(disk: &Disk) -> Vec<u64> {
        disk.chunks().unwrap().into_iter().map(|(n, _)| n).collect()
    }

    /// A rewrite copies the journal while write-outs go on: what they add and remove during the copy is
    /// replayed into the copy, so the new database holds exactly what the old one did when it was swapped in.
    #[test]
    fn a_rewrite_keeps_what_write_outs_did_during_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let disk = Disk::open(&config).unwrap();
        disk.apply(&(0..10).map(chunk).collect::<Vec<_>>(), &[]).unwrap();
        let rewrite = disk.begin_rewrite().unwrap();
        disk.apply(&[chunk(10)], &[3]).unwrap();
        disk.copy_for_rewrite(&rewrite).unwrap();
        disk.apply(&[chunk(11)], &[10, 0]).unwrap();
        disk.finish_rewrite(rewrite).unwrap();
        let expected = vec![1, 2, 4, 5, 6, 7, 8, 9, 11];
        assert_eq!(numbers(&disk), expected);
        assert_eq!(std::fs::read_to_string(dir.path().join("CURRENT")).unwrap().trim(), "sled-2");
        assert!(!dir.path().join("sled-1").exists(), "the old database is removed");
        // Write-outs after the swap go to the new database only, and nothing is noted any more.
        disk.apply(&[chunk(12)], &[]).unwrap();
        assert!(disk.noted().is_none());
        disk.flush().unwrap();
        drop(disk);
        let disk = Disk::open(&config).unwrap();
        assert_eq!(numbers(&disk), [expected, vec![12]].concat());
        let (_, bytes) = disk.chunks().unwrap().pop().unwrap();
        assert!(matches!(entries(12, &bytes).unwrap()[..], [Entry::Put { id: "task12", .. }]));
    }

    /// sled writes a value over about 128 KiB to a file of its own under `blobs/` and never syncs it; a flush
    /// of the store syncs every such file (and the directory), so a large task is as durable as a small one.
    #[test]
    fn a_flush_syncs_the_blob_files_sled_leaves_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let disk = Disk::open(&config).unwrap();
        let mut writer = ChunkWriter::new(0);
        writer.put(&record("large", 300 * 1024)).unwrap();
        disk.apply(&writer.finish().0, &[]).unwrap();
        disk.flush().unwrap();
        let db = disk.db();
        let blobs: std::collections::HashSet<_> =
            std::fs::read_dir(db.path.join("blobs")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!blobs.is_empty(), "sled wrote the large chunk as a blob file");
        assert_eq!(*db.synced_blobs.lock().unwrap(), blobs, "every blob file was synced");
    }

    /// A rewrite abandoned before it finishes leaves the database in use alone and removes its copy.
    #[test]
    fn an_abandoned_rewrite_removes_its_copy() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let disk = Disk::open(&config).unwrap();
        disk.apply(&[chunk(0)], &[]).unwrap();
        let rewrite = disk.begin_rewrite().unwrap();
        assert!(dir.path().join("sled-2").exists());
        disk.apply(&[chunk(1)], &[]).unwrap();
        drop(rewrite);
        assert!(disk.noted().is_none(), "write-outs are no longer noted");
        assert!(!dir.path().join("sled-2").exists());
        assert_eq!(numbers(&disk), vec![0, 1]);
    }
}
