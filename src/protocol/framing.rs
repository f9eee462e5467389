//! Bounded, incremental framing of typed protocol messages (every message after startup).
//!
//! A frame is one type byte, a big-endian int32 length that counts itself but not the type
//! byte, and the body. The length is checked against the limit *before* any buffer space is
//! reserved, so a hostile 2 GiB length costs nothing (PostgreSQL docs, "Message Formats").

use bytes::{Buf, Bytes, BytesMut};

/// Type byte plus length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}' (must be at least 4)", char::from(*tag))]
    TooShort { tag: u8, len: u32 },
    #[error(
        "message type '{}' of {len} bytes is larger than max_message_size ({max} bytes)",
        char::from(*tag)
    )]
    TooLarge { tag: u8, len: usize, max: usize },
}

/// One whole message: the type byte, the length and the body, exactly as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// The message type byte.
    #[must_use]
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The body, after the type byte and the length.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole message as it was received.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// `part`, a slice of this message, as shared bytes (no copy; it keeps the message's
    /// buffer alive, so only for what lives no longer than a request).
    #[must_use]
    pub fn share(&self, part: &[u8]) -> Bytes {
        self.bytes.slice_ref(part)
    }

    #[must_use]
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// A message of type `tag` with `body`.
    #[must_use]
    pub fn new(tag: u8, body: &[u8]) -> Self {
        let mut bytes = bytes::BytesMut::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(&[tag]);
        let len = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(body);
        Self { bytes: bytes.freeze() }
    }

    /// Wraps bytes that already hold exactly one well-formed message.
    #[must_use]
    pub fn from_encoded(bytes: Bytes) -> Self {
        debug_assert!(bytes.len() >= HEADER_LEN);
        Self { bytes }
    }
}

/// Reads the header at the front of `buf`: the type byte and the total frame length
/// (type byte included). `Ok(None)` when fewer than five bytes are buffered.
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort { tag, len });
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { tag, len, max });
    }
    Ok(Some((tag, len + 1)))
}

/// Takes one whole frame off the front of `buf`, or `Ok(None)` if it is not all here yet
/// (after reserving room for the rest, now that its length is known to be acceptable).
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some((_, total)) = peek_header(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame { bytes: buf.split_to(total).freeze() }))
}

/// Reads a NUL-terminated string at the front of `buf` and advances past it.
pub fn get_cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    // most statement and portal names are empty: no search for those
    let end = if buf.first() == Some(&0) { 0 } else { memchr::memchr(0, buf)? };
    let s = &buf[..end];
    buf.advance(end + 1);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn whole_frames_come_out_one_by_one() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'Q', b"select 1\0"));
        buf.extend_from_slice(&frame(b'S', b""));
        let q = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(q.tag(), b'Q');
        assert_eq!(q.body(), b"select 1\0");
        let s = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((s.tag(), s.body()), (b'S', &b""[..]));
        assert!(decode(&mut buf, 1024).unwrap().is_none());
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let bytes = frame(b'Q', b"select 1\0");
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert!(decode(&mut buf, 1024).unwrap().is_none(), "complete too early at byte {i}");
            buf.extend_from_slice(&[*b]);
        }
        assert_eq!(decode(&mut buf, 1024).unwrap().unwrap().as_bytes(), &bytes[..]);
    }

    #[test]
    fn lengths_below_four_are_rejected() {
        for len in 0u32..4 {
            let mut buf = BytesMut::from(&[b'Q'][..]);
            buf.extend_from_slice(&len.to_be_bytes());
            assert_eq!(decode(&mut buf, 1024), Err(FrameError::TooShort { tag: b'Q', len }));
        }
    }

    #[test]
    fn oversized_lengths_are_rejected_before_allocating() {
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        let before = buf.capacity();
        let err = decode(&mut buf, 1 << 20).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { tag: b'Q', len: 0x7fff_ffff, max: 1 << 20 });
        assert_eq!(buf.capacity(), before, "no space may be reserved for a rejected frame");
        // exactly at the limit is fine
        let mut buf = BytesMut::from(&[b'd', 0, 0, 4, 0][..]);
        assert!(decode(&mut buf, 1024).unwrap().is_none());
        assert!(buf.capacity() >= 1025);
    }

    #[test]
    fn cstrings() {
        let mut b: &[u8] = b"user\0app\0\0";
        assert_eq!(get_cstr(&mut b), Some(&b"user"[..]));
        assert_eq!(get_cstr(&mut b), Some(&b"app"[..]));
        assert_eq!(get_cstr(&mut b), Some(&b""[..]));
        assert_eq!(get_cstr(&mut b), None);
    }
}
