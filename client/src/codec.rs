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

#[cfg(test)]
mod tests {
    use super::*;

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
