//! Scanning a stream of backend messages without buffering whole messages.
//!
//! The proxy must see a few server messages (ReadyForQuery, ErrorResponse, ParameterStatus,
//! the COPY responses) but forwards everything else untouched. A DataRow may be up to 1 GiB,
//! so the scanner never waits for a whole uninteresting message: it reports how many bytes
//! at the front can be passed on as they are, and only holds back the small messages it was
//! asked to show.

use super::framing::{FrameError, peek_header};

/// What to do with the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Forward the first `n` bytes unchanged.
    Pass(usize),
    /// The first `len` bytes are one whole message of type `tag` that the caller wanted to see.
    Message { tag: u8, len: usize },
    /// Nothing can be decided until more bytes arrive.
    NeedMore,
}

/// Remembers how much of a passed-through message is still to come.
#[derive(Debug, Default)]
pub struct Scanner {
    remaining: usize,
}

impl Scanner {
    /// True between messages: no passed-through message is still incomplete.
    #[must_use]
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Classifies the front of `buf`. `wanted(tag)` says which message types must be shown
    /// whole; those are limited to `max` bytes. Consecutive uninteresting messages are
    /// merged into one `Pass`. `wanted` is asked once about a message it declines (which is
    /// then passed for sure), and again about one it wants until that one is shown.
    pub fn next(&mut self, buf: &[u8], max: usize, mut wanted: impl FnMut(u8) -> bool) -> Result<Piece, FrameError> {
        let mut pass = 0;
        loop {
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - pass);
                self.remaining -= n;
                pass += n;
                if self.remaining > 0 {
                    break;
                }
            }
            let header = match peek_header(&buf[pass..], usize::MAX >> 1) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                // Let the caller forward what came before the bad frame first.
                Err(_) if pass > 0 => break,
                Err(e) => return Err(e),
            };
            let (tag, len) = header;
            if wanted(tag) {
                if pass > 0 {
                    break;
                }
                if len > max {
                    return Err(FrameError::TooLarge { tag, len, max });
                }
                return Ok(if buf.len() >= len { Piece::Message { tag, len } } else { Piece::NeedMore });
            }
            self.remaining = len;
        }
        Ok(if pass > 0 { Piece::Pass(pass) } else { Piece::NeedMore })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn is_ready(tag: u8) -> bool {
        tag == b'Z'
    }

    #[test]
    fn passes_data_and_stops_at_wanted_messages() {
        let mut buf = msg(b'T', b"rowdesc");
        buf.extend(msg(b'D', b"row1"));
        buf.extend(msg(b'C', b"SELECT 1\0"));
        let data_len = buf.len();
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::default();
        assert_eq!(s.next(&buf, 100, is_ready).unwrap(), Piece::Pass(data_len));
        assert_eq!(s.next(&buf[data_len..], 100, is_ready).unwrap(), Piece::Message { tag: b'Z', len: 6 });
    }

    #[test]
    fn large_rows_pass_through_in_pieces() {
        let row = msg(b'D', &vec![7u8; 10_000]);
        let mut s = Scanner::default();
        // only the header and part of the body have arrived
        assert_eq!(s.next(&row[..100], 64, is_ready).unwrap(), Piece::Pass(100));
        assert_eq!(s.next(&row[100..5000], 64, is_ready).unwrap(), Piece::Pass(4900));
        let mut rest = row[5000..].to_vec();
        rest.extend(msg(b'Z', b"T"));
        assert_eq!(s.next(&rest, 64, is_ready).unwrap(), Piece::Pass(row.len() - 5000));
        assert_eq!(s.next(&rest[row.len() - 5000..], 64, is_ready).unwrap(), Piece::Message { tag: b'Z', len: 6 });
    }

    #[test]
    fn incomplete_wanted_message_waits() {
        let z = msg(b'Z', b"I");
        let mut s = Scanner::default();
        assert_eq!(s.next(&z[..3], 64, is_ready).unwrap(), Piece::NeedMore);
        assert_eq!(s.next(&z[..5], 64, is_ready).unwrap(), Piece::NeedMore);
        assert_eq!(s.next(&z, 64, is_ready).unwrap(), Piece::Message { tag: b'Z', len: 6 });
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut s = Scanner::default();
        assert!(s.next(&[b'D', 0, 0, 0, 2], 64, is_ready).is_err());
        let big = msg(b'Z', &[0u8; 100]);
        assert!(matches!(s.next(&big, 64, is_ready), Err(FrameError::TooLarge { .. })));
    }
}
