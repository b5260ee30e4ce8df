//! What the store knows of the journal on disk ([`super::disk`]): where each task's current record is, and how
//! much of each chunk is still current. From that it picks the chunks a write-out removes and the ones it
//! compacts. Only checkpoint write-outs change it (they run one at a time), under its own lock (`Core::journal`).

use std::collections::{BTreeMap, BTreeSet};

use super::disk::Loc;
use super::{Id, Map};

/// Compaction starts once the journal is larger than this...
const COMPACT_MIN_BYTES: u64 = 4 << 20;
/// ... and more than this many times what is current in it.
const COMPACT_RATIO: u64 = 2;
/// How many bytes of old chunks one write-out compacts at most, so no write-out takes long.
const COMPACT_BUDGET: u64 = 256 << 10;

#[derive(Debug, Default, Clone, Copy)]
struct ChunkStat {
    bytes: u64,
    /// Bytes of the current records in it.
    live: u64,
    tombstones: u32,
}

/// The in-memory account of the journal.
#[derive(Debug, Default)]
pub struct Journal {
    locs: Map<Id, Loc>,
    chunks: BTreeMap<u64, ChunkStat>,
    /// Chunks with no current record.
    empty: BTreeSet<u64>,
    next: u64,
    bytes: u64,
    live: u64,
}

impl Journal {
    /// Where the current record of `id` is on disk, if it is there.
    pub fn loc(&self, id: &str) -> Option<Loc> {
        self.locs.get(id).copied()
    }

    /// The number the next chunk gets.
    pub fn next_chunk(&self) -> u64 {
        self.next
    }

    /// Bytes in the journal, and bytes of current records in it.
    pub fn size(&self) -> (u64, u64) {
        (self.bytes, self.live)
    }

    /// Chunks to compact in the next write-out (their current records are copied into it, then they go): the
    /// oldest, while the journal holds much more than what is current.
    pub fn to_compact(&self) -> Vec<u64> {
        if self.bytes <= COMPACT_MIN_BYTES.max(COMPACT_RATIO.saturating_mul(self.live)) {
            return Vec::new();
        }
        let mut budget = 0;
        let mut out = Vec::new();
        for (number, stat) in &self.chunks {
            if budget >= COMPACT_BUDGET {
                break;
            }
            // Chunks with nothing current cost nothing to compact (and go anyway).
            if !self.empty.contains(number) {
                budget += stat.bytes;
            }
            out.push(*number);
        }
        out
    }

    /// Chunks a write-out that compacts `compacted` can remove: those with no current record, except that one
    /// holding tombstones must wait until every older chunk is gone (its tombstones may hide records in them).
    pub fn to_remove(&self, compacted: &[u64]) -> Vec<u64> {
        let candidates: BTreeSet<u64> = self.empty.iter().chain(compacted).copied().collect();
        let mut removed: Vec<u64> = Vec::new();
        let mut all = self.chunks.keys().copied().peekable();
        for number in candidates {
            let Some(stat) = self.chunks.get(&number) else { continue };
            while all.next_if(|f| *f < number && removed.binary_search(f).is_ok()).is_some() {}
            if stat.tombstones == 0 || all.peek() == Some(&number) {
                removed.push(number);
            }
        }
        removed
    }

    /// A chunk was written.
    pub fn add_chunk(&mut self, number: u64, bytes: u64, tombstones: u32) {
        self.chunks.insert(number, ChunkStat { bytes, live: 0, tombstones });
        self.empty.insert(number);
        self.bytes += bytes;
        self.next = self.next.max(number + 1);
    }

    /// A record of `id` was written at `loc`.
    pub fn set(&mut self, id: &Id, loc: Loc) {
        if let Some(old) = self.locs.insert(id.clone(), loc) {
            self.forget(old);
        }
        if let Some(stat) = self.chunks.get_mut(&loc.chunk) {
            stat.live += u64::from(loc.len);
            self.empty.remove(&loc.chunk);
        }
        self.live += u64::from(loc.len);
    }

    /// Keys `id`'s place by this allocation of its id (recovery reads the two apart).
    pub fn share_id(&mut self, id: &Id) {
        if let Some(loc) = self.locs.remove(&**id) {
            self.locs.insert(id.clone(), loc);
        }
    }

    /// A tombstone of `id` was written.
    pub fn clear(&mut self, id: &str) {
        if let Some(old) = self.locs.remove(id) {
            self.forget(old);
        }
    }

    /// Whether `loc` holds the current record of `id`.
    pub fn is_current(&self, id: &str, loc: Loc) -> bool {
        self.locs.get(id) == Some(&loc)
    }

    /// The task's id as the account holds it, if `loc` holds its current record.
    pub fn current(&self, id: &str, loc: Loc) -> Option<&Id> {
        self.locs.get_key_value(id).filter(|(_, l)| **l == loc).map(|(id, _)| id)
    }

    fn forget(&mut self, old: Loc) {
        self.live = self.live.saturating_sub(u64::from(old.len));
        if let Some(stat) = self.chunks.get_mut(&old.chunk) {
            stat.live = stat.live.saturating_sub(u64::from(old.len));
            if stat.live == 0 {
                self.empty.insert(old.chunk);
            }
        }
    }

    /// Chunks were removed from disk.
    pub fn remove_chunks(&mut self, numbers: &[u64]) {
        for number in numbers {
            if let Some(stat) = self.chunks.remove(number) {
                self.bytes = self.bytes.saturating_sub(stat.bytes);
                if stat.live > 0 {
                    tracing::error!(chunk = number, live = stat.live, "removed a journal chunk still holding records");
                }
            }
            self.empty.remove(number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(chunk: u64) -> Loc {
        Loc { chunk, offset: 1, len: 10 }
    }

    #[test]
    fn chunks_with_tombstones_wait_for_every_older_chunk() {
        let mut j = Journal::default();
        for (n, t) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            j.add_chunk(n, 100, t);
        }
        j.set(&"a".into(), loc(0));
        j.set(&"b".into(), loc(2));
        // 1 and 3 hold only tombstones; 1 waits for 0, 3 for 0 and 2.
        assert_eq!(j.to_remove(&[]), Vec::<u64>::new());
        j.set(&"a".into(), loc(2));
        assert_eq!(j.to_remove(&[]), vec![0, 1]);
        j.remove_chunks(&[0, 1]);
        j.clear("a");
        j.clear("b");
        assert_eq!(j.to_remove(&[]), vec![2, 3]);
        // Compacted chunks go even when they hold records (the write-out copies those).
        j.add_chunk(4, 100, 0);
        j.set(&"c".into(), loc(4));
        assert_eq!(j.to_remove(&[4]), vec![2, 3, 4]);
        assert_eq!(j.next_chunk(), 5);
    }

    #[test]
    fn compaction_starts_when_the_journal_is_mostly_garbage() {
        let mut j = Journal::default();
        for n in 0..100 {
            j.add_chunk(n, 100 << 10, 0);
            j.set(&format!("t{n}").into(), Loc { chunk: n, offset: 1, len: 90 << 10 });
        }
        assert!(j.to_compact().is_empty(), "mostly current");
        for n in 0..90 {
            j.set(&format!("t{n}").into(), Loc { chunk: 99, offset: 1, len: 1 });
        }
        let picked = j.to_compact();
        assert_eq!(picked, (0..93).collect::<Vec<u64>>(), "oldest first; the empty ones cost no budget");
    }
}
