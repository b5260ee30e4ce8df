//! The daemon's reading of request frames: the length-prefixed framing of proto.md §2, with bounds that hold
//! when clients are hostile or careless.
//!
//! - A frame longer than `max_frame_bytes` is skipped as it arrives (never buffered) and answered
//!   `frame_too_large`.
//! - The bytes of a frame larger than [`SMALL_FRAME`] are taken, as they arrive, from a budget shared by every
//!   connection (`max_unfinished_bytes`): the bytes of frames not complete yet are bounded daemon-wide, however
//!   many connections announce 16 MiB and send all but the last byte. When the budget cannot take them, the frame
//!   is dropped and skipped and answered `busy`. The budget is given back when the frame is complete or the
//!   connection closes, and the buffer that grew to hold the frame is let go.
//! - [`RequestCodec::unfinished_since`] says since when a frame has been incomplete, so the connection can close
//!   one that does not complete within `frame_timeout_ms`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Frames up to this size are read without taking from the shared budget (a connection holds at most this much
/// of an unfinished small frame, and only until `frame_timeout_ms`).
pub const SMALL_FRAME: usize = 16 * 1024;
/// A large frame's buffer grows when less than this is left free in it...
const GROW_SLACK: usize = 4 * 1024;
/// ... to twice its size, and at least this.
const GROW_MIN: usize = SMALL_FRAME;

/// What the reader produces.
#[derive(Debug)]
pub enum Request {
    /// A frame's payload.
    Message(Bytes),
    /// A frame longer than the maximum was skipped; its declared length.
    TooLarge(u64),
    /// A frame the shared budget could not hold was skipped; its declared length.
    Busy(u64),
}

/// Bytes that unfinished large frames may hold, across all connections.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicUsize::new(0) })
    }

    /// Takes `n` bytes if they fit.
    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// The decoder of one connection's requests.
#[derive(Debug)]
pub struct RequestCodec {
    max_frame: usize,
    budget: Arc<Budget>,
    /// Bytes left to skip of a refused frame, its declared length, and whether it was refused for the budget.
    skipping: Option<(u64, u64, bool)>,
    /// What the frame being read took from the budget.
    reserved: usize,
    unfinished_since: Option<Instant>,
}

impl RequestCodec {
    /// A decoder for frames up to `max_frame` bytes, large ones held within `budget`.
    pub fn new(max_frame: usize, budget: Arc<Budget>) -> RequestCodec {
        RequestCodec { max_frame, budget, skipping: None, reserved: 0, unfinished_since: None }
    }

    /// When the frame being read (or skipped) began to arrive, if one has begun and is not complete.
    pub fn unfinished_since(&self) -> Option<Instant> {
        self.unfinished_since
    }

    fn unfinished(&mut self) {
        self.unfinished_since.get_or_insert_with(Instant::now);
    }

    fn give_back(&mut self) {
        if self.reserved > 0 {
            self.budget.give(self.reserved);
            self.reserved = 0;
        }
    }
}

impl Drop for RequestCodec {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Decoder for RequestCodec {
    type Item = Request;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, Self::Error> {
        if let Some((left, declared, busy)) = self.skipping {
            let n = left.min(src.len() as u64);
            src.advance(n as usize);
            if n < left {
                self.skipping = Some((left - n, declared, busy));
                self.unfinished();
                // Skipped a read at a time: reads of a few bytes (a buffer let go is empty, and the reader grows
                // it by little) would take minutes for a large frame.
                if src.capacity() < SMALL_FRAME {
                    src.reserve(SMALL_FRAME);
                }
                return Ok(None);
            }
            self.skipping = None;
            self.unfinished_since = None;
            return Ok(Some(if busy { Request::Busy(declared) } else { Request::TooLarge(declared) }));
        }
        if src.len() < 4 {
            if !src.is_empty() {
                self.unfinished();
            }
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            src.advance(4);
            self.skipping = Some((len as u64, len as u64, false));
            return self.decode(src);
        }
        if len > SMALL_FRAME {
            // A large frame takes from the budget the memory its bytes hold as they arrive (the buffer's
            // capacity, which grows ahead of them), not the length it announces. When the budget cannot take it,
            // what arrived is dropped, the buffer let go, and the rest skipped.
            let held = src.capacity().max(src.len()).min(4 + len);
            // The buffer grows ahead of the bytes in steps this codec chooses and charges before allocating (the
            // reader's own growth doubles it unseen, which let a connection hold twice what was charged).
            let nearly_full = src.capacity() - src.len() < GROW_SLACK;
            let want =
                if src.len() < 4 + len && nearly_full { (src.capacity() * 2).max(GROW_MIN).min(4 + len) } else { held };
            let want = want.max(held);
            if want > self.reserved {
                if !self.budget.try_take(want - self.reserved) {
                    self.give_back();
                    let arrived = src.len().min(4 + len);
                    src.advance(arrived);
                    *src = BytesMut::from(&src[..]);
                    let held = arrived;
                    let left = (4 + len - held) as u64;
                    if left == 0 {
                        self.unfinished_since = None;
                        return Ok(Some(Request::Busy(len as u64)));
                    }
                    self.skipping = Some((left, len as u64, true));
                    self.unfinished();
                    return Ok(None);
                }
                self.reserved = want;
            }
            if want > src.capacity() {
                let mut bigger = BytesMut::with_capacity(want);
                bigger.extend_from_slice(src);
                *src = bigger;
            }
        }
        if src.len() < 4 + len {
            if len <= SMALL_FRAME {
                src.reserve(4 + len - src.len());
            }
            self.unfinished();
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(len).freeze();
        self.give_back();
        if len > SMALL_FRAME && src.capacity() > 2 * SMALL_FRAME {
            // The buffer grew to hold the frame; its allocation would stay with the connection.
            *src = BytesMut::from(&src[..]);
        }
        self.unfinished_since = if src.is_empty() { None } else { Some(Instant::now()) };
        Ok(Some(Request::Message(frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut bytes = (len as u32).to_be_bytes().to_vec();
        bytes.resize(4 + len, 0x90);
        bytes
    }

    #[test]
    fn large_unfinished_frames_share_one_budget() {
        let budget = Budget::new(100_000);
        let mut a = RequestCodec::new(1 << 20, budget.clone());
        let mut b = RequestCodec::new(1 << 20, budget.clone());
        let big = frame(60_000);
        let mut buf_a = BytesMut::from(&big[..60_000]);
        assert!(a.decode(&mut buf_a).unwrap().is_none());
        // The buffer was full: it grew (charged first) to hold the rest of the frame, and no more.
        assert_eq!(budget.used(), 60_004, "what arrived is held, with room for the rest");
        assert_eq!(buf_a.capacity(), 60_004);
        assert!(a.unfinished_since().is_some());
        // A length prefix alone takes a small buffer's worth, not the length it announces.
        let mut header_only = BytesMut::from(&big[..4]);
        let mut c = RequestCodec::new(1 << 20, budget.clone());
        assert!(c.decode(&mut header_only).unwrap().is_none());
        assert_eq!(budget.used(), 60_004 + SMALL_FRAME);
        drop(c);
        assert_eq!(budget.used(), 60_004);
        // The second does not fit: dropped and skipped as it arrives, answered busy, nothing held.
        let mut buf_b = BytesMut::from(&big[..]);
        assert!(matches!(b.decode(&mut buf_b).unwrap(), Some(Request::Busy(60_000))));
        assert_eq!(budget.used(), 60_004);
        // A small frame needs no budget.
        let mut small = BytesMut::from(&frame(100)[..]);
        assert!(matches!(b.decode(&mut small).unwrap(), Some(Request::Message(m)) if m.len() == 100));
        // The first completes and gives its share back; so does a connection that closes mid-frame.
        buf_a.extend_from_slice(&big[60_000..]);
        assert!(matches!(a.decode(&mut buf_a).unwrap(), Some(Request::Message(m)) if m.len() == 60_000));
        assert_eq!(budget.used(), 0);
        assert!(a.unfinished_since().is_none());
        assert!(buf_a.capacity() <= 2 * SMALL_FRAME, "the grown buffer is let go");
        let mut half = BytesMut::from(&big[..30_000]);
        assert!(a.decode(&mut half).unwrap().is_none());
        assert_eq!(budget.used(), 60_000, "grown to twice what it held");
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_frame_over_the_maximum_is_skipped_not_buffered() {
        let mut codec = RequestCodec::new(1000, Budget::new(1 << 20));
        let mut buf = BytesMut::from(&frame(5000)[..2000]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty(), "skipped bytes are dropped as they arrive");
        buf.extend_from_slice(&frame(5000)[2000..]);
        assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Request::TooLarge(5000))));
    }
}
