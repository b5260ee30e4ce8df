//! The write-ahead log: append-only segment files in `data_dir/wal/`, the only thing a reply waits for.
//!
//! A segment is `wal/<number:016x>.log`: the 8 bytes [`MAGIC`], then records. A record is
//!
//! ```text
//! len:u32 LE  crc:u32 LE  payload (len bytes)
//! ```
//!
//! where `crc` is the CRC32C of the segment's number (8 bytes, little-endian), the four `len` bytes and the
//! payload, and the payload is one journal entry in the chunk layout of [`super::disk`] (its format byte, then a
//! put with the task's whole record, or a tombstone). Each record carries the latest state of one task, so
//! replaying segments in order and keeping the last entry of each id gives the state they hold. A log round (one
//! append, the changes of every request handled since the last) ends with a commit record, a tombstone for the
//! empty id: replay applies a round's records only once it reaches its commit record, so the changes one request
//! made to several tasks (an ack and the next link of its chain) come back together or not at all.
//!
//! Segments are recycled, as PostgreSQL recycles its WAL files: a segment a checkpoint no longer needs becomes
//! the spare (`wal/spare`), and the next segment is the spare renamed, its header rewritten. Appending then
//! overwrites blocks the file already has, so `fdatasync` writes the data and no file-size metadata (about half
//! the time of an append to a growing file, measured here). The old records left behind the new tail fail their
//! checksum, since it covers the segment's number, so a reader stops at the end of what this use wrote.
//!
//! This module only writes and reads files: which records go in, when they are synced, and when a segment may
//! be deleted are decided by the commit path ([`super::commit`]) and the checkpoint ([`super::checkpoint`]).
//! Reading back stops at the first record that is short, has a length of zero or fails its checksum (a write
//! torn by a crash, or garbage after it): what follows is dropped, and reported, never an error.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::disk::{io_error, sync_dir};
use super::record::TaskRecord;
use super::StoreError;

/// The first bytes of every segment: the format of what follows. In `BRKWAL02` segments every log round ends
/// with a commit record ([`LogBatch::end_round`]); recovery applies a round only when its commit record is there,
/// so a round is all or nothing, however a crash tore its write.
pub const MAGIC: &[u8; 8] = b"BRKWAL02";
/// Segments written before rounds had commit records: each record stands alone.
pub const MAGIC_V1: &[u8; 8] = b"BRKWAL01";
/// Bytes before a record's payload.
const HEADER: usize = 8;
/// The most a log batch's buffer keeps between rounds.
const KEEP_BYTES: usize = 1 << 20;
/// The id of a round's commit record (a tombstone; task ids are never empty).
pub const COMMIT_ID: &str = "";
/// The name of the recycled segment waiting to be used next.
const SPARE: &str = "spare";

/// The CRC32C of a record of segment `segment`: its number, the length bytes, the payload.
fn checksum(segment: u64, len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&segment.to_le_bytes()), &len_bytes), payload)
}

/// The path of segment `number` in `dir`.
pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}.log"))
}

/// Records encoded for one append to one segment, in log format.
#[derive(Default)]
pub struct LogBatch {
    buf: Vec<u8>,
    segment: u64,
}

impl LogBatch {
    /// Starts a record; returns where its header is.
    fn begin(&mut self) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER]);
        start
    }

    /// Writes the header of the record that began at `start`.
    fn seal(&mut self, start: usize) -> Result<(), StoreError> {
        let len = u32::try_from(self.buf.len() - start - HEADER)
            .map_err(|_| StoreError::Corrupt { id: String::new(), message: "record too large to log".into() })?;
        let len_bytes = len.to_le_bytes();
        let crc = checksum(self.segment, len_bytes, &self.buf[start + HEADER..]);
        self.buf[start..start + 4].copy_from_slice(&len_bytes);
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Appends a task's record.
    pub fn put(&mut self, record: &TaskRecord) -> Result<(), StoreError> {
        let start = self.begin();
        let entry = self.buf.len();
        let result = super::disk::write_put(&mut self.buf, record);
        if result.is_err() {
            self.buf.truncate(start);
            return result;
        }
        debug_assert!(self.buf.len() > entry);
        self.seal(start)
    }

    /// Appends a tombstone.
    pub fn delete(&mut self, id: &str) -> Result<(), StoreError> {
        let start = self.begin();
        if let Err(e) = super::disk::write_delete(&mut self.buf, id) {
            self.buf.truncate(start);
            return Err(e);
        }
        self.seal(start)
    }

    /// Ends a log round: the commit record (a tombstone for the empty id, which no task has). Every record
    /// since the previous one belongs to the round.
    pub fn end_round(&mut self) -> Result<(), StoreError> {
        self.delete(COMMIT_ID)
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties it for records that go to segment `segment`, keeping its buffer up to [`KEEP_BYTES`]: a round of
    /// large tasks would otherwise hold their size in memory for as long as the daemon runs.
    pub fn clear(&mut self, segment: u64) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_BYTES {
            self.buf = Vec::with_capacity(KEEP_BYTES);
        }
        self.segment = segment;
    }
}

/// The segment being appended to. Only the log writer holds it.
pub struct Wal {
    dir: PathBuf,
    number: u64,
    file: File,
    /// Bytes in the segment.
    size: u64,
}

impl Wal {
    /// Starts segment `number` in `dir`: the spare renamed if there is one, else a new file (replacing a leftover
    /// of that name), and makes it durable: its header, and its name in the directory.
    pub fn create(dir: &Path, number: u64) -> Result<Wal, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
        let path = segment_path(dir, number);
        let spare = dir.join(SPARE);
        let recycled = match std::fs::rename(&spare, &path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error("cannot recycle", &spare, e)),
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!recycled)
            .open(&path)
            .map_err(|e| io_error("cannot create", &path, e))?;
        file.write_all(MAGIC).and_then(|()| file.sync_all()).map_err(|e| io_error("cannot write", &path, e))?;
        sync_dir(dir)?;
        Ok(Wal { dir: dir.to_path_buf(), number, file, size: MAGIC.len() as u64 })
    }

    /// The segment's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Bytes in the segment.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether anything was appended since the header.
    pub fn has_records(&self) -> bool {
        self.size > MAGIC.len() as u64
    }

    /// Appends bytes (one `write` for a batch). Not durable until [`Wal::sync`].
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(bytes)
            .map_err(|e| io_error("cannot append to", &segment_path(&self.dir, self.number), e))?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything appended durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|e| io_error("cannot sync", &segment_path(&self.dir, self.number), e))
    }

    /// Syncs this segment and starts the next one; returns its number. Every record appended before is durable
    /// afterwards, so a segment older than the one in use never has an unsynced tail. The next segment is
    /// usually [`prepare`]d already, so this costs one `fdatasync` and an `open`, not a directory sync.
    pub fn rotate(&mut self) -> Result<u64, StoreError> {
        self.sync()?;
        let next = self.number + 1;
        let path = segment_path(&self.dir, next);
        *self = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(mut file) => {
                // Prepared: its header is written and durable, and so is its name.
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(MAGIC.len() as u64))
                    .map_err(|e| io_error("cannot seek in", &path, e))?;
                Wal { dir: self.dir.clone(), number: next, file, size: MAGIC.len() as u64 }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Wal::create(&self.dir, next)?,
            Err(e) => return Err(io_error("cannot open", &path, e)),
        };
        Ok(self.number)
    }
}

/// Makes segment `number` ready for [`Wal::rotate`] ahead of time (the spare renamed, or a new file; its header
/// and name durable), so the log writer does not pay for it. Does nothing if it exists.
pub fn prepare(dir: &Path, number: u64) -> Result<(), StoreError> {
    if segment_path(dir, number).exists() {
        return Ok(());
    }
    Wal::create(dir, number).map(drop)
}

/// The segments in `dir`, oldest first (none if `dir` does not exist).
pub fn segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("cannot list", dir, e)),
    };
    let mut out: Vec<u64> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let number = name.to_str()?.strip_suffix(".log")?;
            u64::from_str_radix(number, 16).ok().filter(|_| number.len() == 16)
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Deletes the segments numbered below `number` (a checkpoint holds what they held), keeping the newest of
/// them as the spare if there is none.
pub fn remove_before(dir: &Path, number: u64) -> Result<usize, StoreError> {
    let mut removed = 0;
    let spare = dir.join(SPARE);
    let mut need_spare = !spare.exists();
    for old in segments(dir)?.into_iter().filter(|n| *n < number).rev() {
        let path = segment_path(dir, old);
        if need_spare {
            std::fs::rename(&path, &spare).map_err(|e| io_error("cannot recycle", &path, e))?;
            need_spare = false;
        } else {
            std::fs::remove_file(&path).map_err(|e| io_error("cannot remove", &path, e))?;
        }
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// A segment read back: its bytes and where each valid record's payload is.
pub struct Segment {
    /// The segment's number.
    pub number: u64,
    /// The whole file.
    pub bytes: Vec<u8>,
    /// (offset, length) of each valid record's payload, in order.
    pub records: Vec<(usize, usize)>,
    /// Bytes after the last valid record (a torn or garbage tail), dropped.
    pub dropped: usize,
    /// Whether its rounds end with commit records ([`MAGIC`]), or each record stands alone ([`MAGIC_V1`]).
    pub rounds: bool,
}

impl Segment {
    /// The payloads of its valid records, in order.
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.records.iter().map(|(at, len)| &self.bytes[*at..*at + *len])
    }
}

/// Reads a segment, keeping its records up to the first bad one.
pub fn read(dir: &Path, number: u64) -> Result<Segment, StoreError> {
    let path = segment_path(dir, number);
    // A device under a segment's name (a mistake) would be read forever: refuse it.
    let meta = std::fs::metadata(&path).map_err(|e| io_error("cannot read", &path, e))?;
    if !meta.is_file() {
        return Err(StoreError::Flush(format!("log segment {} is not a regular file", path.display())));
    }
    let bytes = std::fs::read(&path).map_err(|e| io_error("cannot read", &path, e))?;
    let (records, dropped) = scan(number, &bytes);
    let rounds = bytes.starts_with(MAGIC);
    Ok(Segment { number, bytes, records, dropped, rounds })
}

/// The valid records of a segment's bytes, and how many bytes follow the last of them.
fn scan(number: u64, bytes: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut records = Vec::new();
    if !bytes.starts_with(MAGIC) && !bytes.starts_with(MAGIC_V1) {
        // Created but its header never reached the disk: it holds nothing.
        return (records, bytes.len());
    }
    let mut at = MAGIC.len();
    while bytes.len() - at >= HEADER {
        let len_bytes: [u8; 4] = bytes[at..at + 4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(len_bytes) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let start = at + HEADER;
        if len == 0 || len > bytes.len() - start {
            break;
        }
        let payload = &bytes[start..start + len];
        if checksum(number, len_bytes, payload) != crc {
            break;
        }
        records.push((start, len));
        at = start + len;
    }
    (records, bytes.len() - at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> TaskRecord {
        TaskRecord { id: id.into(), queue: "q".into(), task: "t".into(), ..TaskRecord::default() }
    }

    fn batch(segment: u64, ids: &[&str]) -> LogBatch {
        let mut batch = LogBatch::default();
        batch.clear(segment);
        for id in ids {
            batch.put(&record(id)).unwrap();
        }
        batch
    }

    fn ids(segment: &Segment) -> Vec<String> {
        segment
            .payloads()
            .map(|p| match &super::super::disk::entries(0, p).unwrap()[..] {
                [super::super::disk::Entry::Put { id, .. }] => id.to_string(),
                [super::super::disk::Entry::Delete { id }] => format!("-{id}"),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn segments_from_before_rounds_read_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 5).unwrap();
        let mut round = batch(5, &["a", "b"]);
        round.end_round().unwrap();
        wal.append(round.bytes()).unwrap();
        wal.sync().unwrap();
        let segment = read(dir.path(), 5).unwrap();
        assert!(segment.rounds);
        assert_eq!(ids(&segment), ["a", "b", "-"], "the commit record: a tombstone for the empty id");
        // The same records under the old header: no rounds, each record on its own.
        let path = segment_path(dir.path(), 5);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..MAGIC_V1.len()].copy_from_slice(MAGIC_V1);
        std::fs::write(&path, &bytes).unwrap();
        let old = read(dir.path(), 5).unwrap();
        assert!(!old.rounds);
        assert_eq!(ids(&old).len(), 3);
    }

    #[test]
    fn records_read_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 3).unwrap();
        wal.append(batch(3, &["a", "b"]).bytes()).unwrap();
        let mut gone = LogBatch::default();
        gone.clear(3);
        gone.delete("a").unwrap();
        wal.append(gone.bytes()).unwrap();
        assert_eq!(wal.rotate().unwrap(), 4);
        wal.append(batch(4, &["c"]).bytes()).unwrap();
        wal.sync().unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![3, 4]);
        let first = read(dir.path(), 3).unwrap();
        assert_eq!((ids(&first), first.dropped), (vec!["a".into(), "b".into(), "-a".into()], 0));
        assert_eq!(ids(&read(dir.path(), 4).unwrap()), vec!["c".to_string()]);
        assert_eq!(remove_before(dir.path(), 4).unwrap(), 1);
        assert_eq!(segments(dir.path()).unwrap(), vec![4]);
    }

    /// A segment no checkpoint needs becomes the spare, and the next segment reuses its file: the records of its
    /// earlier use, behind the new ones, are not read back (their checksums name the old segment).
    #[test]
    fn a_prepared_segment_is_used_by_the_next_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        wal.append(batch(1, &["a"]).bytes()).unwrap();
        prepare(dir.path(), 2).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![1, 2]);
        assert_eq!(ids(&read(dir.path(), 2).unwrap()), Vec::<String>::new(), "a prepared segment holds nothing");
        assert_eq!(wal.rotate().unwrap(), 2);
        wal.append(batch(2, &["b", "c"]).bytes()).unwrap();
        wal.sync().unwrap();
        assert_eq!(ids(&read(dir.path(), 2).unwrap()), vec!["b".to_string(), "c".to_string()]);
        assert_eq!(ids(&read(dir.path(), 1).unwrap()), vec!["a".to_string()]);
    }

    #[test]
    fn a_recycled_segment_reads_back_only_what_its_new_use_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        wal.append(batch(1, &["old1", "old2", "old3", "old4"]).bytes()).unwrap();
        wal.rotate().unwrap();
        remove_before(dir.path(), 2).unwrap();
        assert!(dir.path().join(SPARE).exists(), "segment 1 is the spare");
        assert_eq!(segments(dir.path()).unwrap(), vec![2]);
        let old_len = std::fs::metadata(dir.path().join(SPARE)).unwrap().len();
        assert_eq!(wal.rotate().unwrap(), 3);
        assert!(!dir.path().join(SPARE).exists(), "segment 3 is the spare renamed");
        assert_eq!(std::fs::metadata(segment_path(dir.path(), 3)).unwrap().len(), old_len, "its blocks are reused");
        wal.append(batch(3, &["new"]).bytes()).unwrap();
        wal.sync().unwrap();
        let segment = read(dir.path(), 3).unwrap();
        assert_eq!(ids(&segment), vec!["new".to_string()]);
        assert!(segment.dropped > 0, "the old records are behind the new tail");
    }

    /// A torn last record, a flipped bit, zeros and garbage after the last good record: reading stops there and
    /// says how much it dropped.
    #[test]
    fn a_bad_tail_is_cut_at_the_first_bad_record() {
        let good = batch(9, &["a", "b"]);
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(good.bytes());
        let whole = file.len();
        let third = batch(9, &["c"]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("torn", third.bytes()[..third.bytes().len() - 3].to_vec()),
            ("flipped bit", {
                let mut b = third.bytes().to_vec();
                let last = b.len() - 1;
                b[last] ^= 1;
                b
            }),
            ("zeros", vec![0; 4096]),
            ("garbage", (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
            ("short header", vec![7, 0, 0]),
        ];
        for (what, tail) in cases {
            let mut bytes = file.clone();
            bytes.extend_from_slice(&tail);
            let (records, dropped) = scan(9, &bytes);
            assert_eq!(records.len(), 2, "{what}");
            assert_eq!(dropped, bytes.len() - whole, "{what}");
        }
        assert_eq!(scan(9, &[]), (vec![], 0), "an empty file holds nothing");
        assert_eq!(scan(9, b"BRKW").1, 4, "a header cut short holds nothing");
        assert_eq!(scan(8, &file).0.len(), 0, "records of another segment are not this one's");
    }
}
