//! The framing: a 4-byte big-endian length, then that many bytes holding one MessagePack value.
//!
//! The codec only cuts the byte stream into frames; it never interprets MessagePack. A frame whose length prefix
//! exceeds the maximum is not buffered: its bytes are counted off and dropped as they arrive, and the decoder then
//! yields [`Frame::TooLarge`] so the caller can answer `frame_too_large` and keep the connection, because the
//! framing itself is still intact.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// One item cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A frame's payload (the bytes after the length prefix).
    Message(Bytes),
    /// A frame longer than the maximum was skipped; its declared length.
    TooLarge(u64),
}

/// Length-prefixed framing with a maximum frame size.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
    /// Bytes of an oversized frame still to drop, and its declared length.
    skipping: Option<(u64, u64)>,
}

impl FrameCodec {
    /// A codec that refuses (and skips) frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame, skipping: None }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some((left, declared)) = self.skipping {
            let n = left.min(src.len() as u64);
            src.advance(n as usize);
            if n < left {
                self.skipping = Some((left - n, declared));
                return Ok(None);
            }
            self.skipping = None;
            return Ok(Some(Frame::TooLarge(declared)));
        }
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            src.advance(4);
            self.skipping = Some((len as u64, len as u64));
            return self.decode(src);
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(Frame::Message(src.split_to(len).freeze())))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), Self::Error> {
        self.encode(&item[..], dst)
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), Self::Error> {
        let len = u32::try_from(item.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
        dst.reserve(4 + item.len());
        dst.put_u32(len);
        dst.extend_from_slice(item);
        Ok(())
    }
}

/// The deepest nesting of arrays and maps a frame may have. Decoding is recursive, so a hostile frame of 100 000
/// nested arrays would otherwise overflow the stack.
pub const MAX_DEPTH: usize = 100;

/// Checks, without allocating per element and without recursion, that `buf` holds exactly one well-formed
/// MessagePack value nested at most `max_depth` deep, and that no length prefix claims more than the buffer holds.
/// Run before decoding untrusted frames: it turns stack exhaustion and huge preallocations into a clear error.
pub fn check_msgpack(buf: &[u8], max_depth: usize) -> Result<(), String> {
    let pos = value_len(buf, max_depth)?;
    if pos != buf.len() {
        return Err(format!("{} trailing bytes after the value", buf.len() - pos));
    }
    Ok(())
}

/// The length in bytes of the one MessagePack value that `buf` starts with (bytes after it are not looked at),
/// checked as [`check_msgpack`] checks a whole frame: well-formed, nested at most `max_depth` deep, no length
/// prefix claiming more than the buffer holds. Lets the daemon keep a value's bytes as they came, undecoded.
pub fn value_len(buf: &[u8], max_depth: usize) -> Result<usize, String> {
    walk(buf, max_depth, false)
}

/// [`value_len`], also checking that every `str` in the value holds UTF-8, as the format requires: a value kept
/// as bytes and handed to other clients unread must not carry a `str` their decoders refuse.
pub fn value_len_utf8(buf: &[u8], max_depth: usize) -> Result<usize, String> {
    walk(buf, max_depth, true)
}

fn walk(buf: &[u8], max_depth: usize, utf8: bool) -> Result<usize, String> {
    fn read_len(buf: &[u8], pos: &mut usize, width: usize) -> Result<u64, String> {
        let bytes = buf.get(*pos..*pos + width).ok_or("truncated length")?;
        *pos += width;
        Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    let mut pos = 0usize;
    // Items still to read at each open level; the outermost "level" holds the one top value.
    let mut remaining = Levels::new();
    while let Some(top) = remaining.last_mut() {
        if *top == 0 {
            remaining.pop();
            continue;
        }
        *top -= 1;
        let marker = *buf.get(pos).ok_or("truncated value")?;
        pos += 1;
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => return Err("invalid marker 0xc1".into()),
            0xc4 | 0xd9 => (read_len(buf, &mut pos, 1)?, 0),
            0xc5 | 0xda => (read_len(buf, &mut pos, 2)?, 0),
            0xc6 | 0xdb => (read_len(buf, &mut pos, 4)?, 0),
            0xc7 => (read_len(buf, &mut pos, 1)? + 1, 0),
            0xc8 => (read_len(buf, &mut pos, 2)? + 1, 0),
            0xc9 => (read_len(buf, &mut pos, 4)? + 1, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, read_len(buf, &mut pos, 2)?),
            0xdd => (0, read_len(buf, &mut pos, 4)?),
            0xde => (0, 2 * read_len(buf, &mut pos, 2)?),
            0xdf => (0, 2 * read_len(buf, &mut pos, 4)?),
        };
        let left = (buf.len() - pos) as u64;
        if skip > left {
            return Err(format!("a length of {skip} bytes runs past the end of the frame"));
        }
        if utf8 && matches!(marker, 0xa0..=0xbf | 0xd9..=0xdb) {
            std::str::from_utf8(&buf[pos..pos + skip as usize])
                .map_err(|e| format!("a str that is not UTF-8 ({e}); send bytes as bin"))?;
        }
        pos += skip as usize;
        if children > 0 {
            // Every element takes at least one byte, so a count larger than what is left is a lie.
            if children > left - skip {
                return Err(format!("a container claims {children} elements but the frame is too short"));
            }
            if remaining.len() > max_depth {
                return Err(format!("nested deeper than {max_depth} levels"));
            }
            remaining.push(children);
        }
    }
    Ok(pos)
}

/// The walk's stack of open levels: inline for the usual few, on the heap only past them. The walk runs several
/// times per request (the frame check, each field's bytes), so an allocation each time showed in profiles.
struct Levels {
    inline: [u64; 16],
    len: usize,
    spill: Vec<u64>,
}

impl Levels {
    fn new() -> Levels {
        Levels { inline: [1; 16], len: 1, spill: Vec::new() }
    }

    fn len(&self) -> usize {
        self.len + self.spill.len()
    }

    fn last_mut(&mut self) -> Option<&mut u64> {
        if let Some(last) = self.spill.last_mut() {
            return Some(last);
        }
        self.len.checked_sub(1).map(|i| &mut self.inline[i])
    }

    fn pop(&mut self) {
        if self.spill.pop().is_none() {
            self.len = self.len.saturating_sub(1);
        }
    }

    fn push(&mut self, items: u64) {
        if self.len < self.inline.len() && self.spill.is_empty() {
            self.inline[self.len] = items;
            self.len += 1;
        } else {
            self.spill.push(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_msgpack_accepts_real_values_and_refuses_hostile_ones() {
        let value = rmpv::Value::Map(vec![
            (rmpv::Value::from("args"), rmpv::Value::Array(vec![rmpv::Value::from(1.5), rmpv::Value::from(-7)])),
            (rmpv::Value::from("bin"), rmpv::Value::Binary(vec![1, 2, 3])),
            (rmpv::Value::from("ext"), rmpv::Value::Ext(3, vec![9; 20])),
            (rmpv::Value::from("big"), rmpv::Value::from(u64::MAX)),
            (rmpv::Value::from("s"), rmpv::Value::from("x".repeat(70_000))),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &value).unwrap();
        assert_eq!(check_msgpack(&buf, MAX_DEPTH), Ok(()));
        let mut deep = vec![0x91u8; 200];
        deep.push(0xc0);
        assert!(check_msgpack(&deep, MAX_DEPTH).unwrap_err().contains("nested"));
        assert!(check_msgpack(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01], MAX_DEPTH).is_err());
        assert!(check_msgpack(&[0xdb, 0xff, 0xff, 0xff, 0xff], MAX_DEPTH).is_err());
        assert!(check_msgpack(&[0xc0, 0xc0], MAX_DEPTH).unwrap_err().contains("trailing"));
        assert!(check_msgpack(&[], MAX_DEPTH).is_err());
        assert_eq!(value_len(&[0x92, 0x01, 0xa1, b'x', 0xc0], MAX_DEPTH), Ok(4));
        assert!(value_len(&[0x92, 0x01], MAX_DEPTH).is_err());
        assert_eq!(value_len(&[0x91, 0xa1, 0xff], MAX_DEPTH), Ok(3));
        assert!(value_len_utf8(&[0x91, 0xa1, 0xff], MAX_DEPTH).unwrap_err().contains("not UTF-8"));
        assert_eq!(value_len_utf8(&[0x91, 0xc4, 0x01, 0xff], MAX_DEPTH), Ok(4));
    }

    #[test]
    fn cuts_frames_and_skips_oversized_ones() {
        let mut codec = FrameCodec::new(4);
        let mut buf = BytesMut::new();
        buf.put_u32(10);
        buf.extend_from_slice(b"0123");
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"456789");
        buf.put_u32(2);
        buf.extend_from_slice(b"ok");
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::TooLarge(10)));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Message(Bytes::from_static(b"ok"))));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }
}
