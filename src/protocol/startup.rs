//! The first packet a client sends, which has no type byte: a length, a code, and a body.
//!
//! Codes (PostgreSQL docs, "Message Formats"): 196608 is StartupMessage 3.0, 80877103
//! SSLRequest, 80877104 GSSENCRequest, 80877102 CancelRequest. Major version 3 with a higher
//! minor (PostgreSQL 18's libpq asks for 3.2) is accepted and answered with
//! NegotiateProtocolVersion. Anything else is a protocol error.

use bytes::{Buf, BytesMut};

use super::framing::get_cstr;

/// PostgreSQL's own limit for startup packets (`MAX_STARTUP_PACKET_LENGTH` in pqcomm.h).
pub const MAX_STARTUP_LEN: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// pgrouter's own code for a CancelRequest one instance forwards to its peers: the peer
/// handles it for its own clients only and never forwards it again.
pub const PEER_CANCEL_REQUEST: u32 = 80_877_223;

/// A cancel key: the process id and secret from BackendKeyData. Protocol 3.2 allows secrets of
/// 4 to 256 bytes; 3.0 uses exactly 4.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelKey {{ pid: {}, secret: **** }}", self.pid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Startup(StartupMessage),
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    /// A CancelRequest forwarded by another pgrouter instance.
    PeerCancel(CancelKey),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor_version: u16,
    /// Every parameter except the `_pq_.` protocol options, in the order sent.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; pgrouter supports none of them.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    #[must_use]
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    #[error("unsupported frontend protocol {}.{}: pgrouter speaks protocol 3", .0 >> 16, .0 & 0xffff)]
    UnsupportedProtocol(u32),
    #[error("invalid startup packet: {0}")]
    Malformed(&'static str),
}

/// Takes one startup packet off the front of `buf`, or `Ok(None)` if it is not all here yet.
pub fn decode(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut body = &packet[4..];
    let code = body.get_u32();
    let parsed = match code {
        SSL_REQUEST if body.is_empty() => StartupPacket::SslRequest,
        GSSENC_REQUEST if body.is_empty() => StartupPacket::GssEncRequest,
        CANCEL_REQUEST => StartupPacket::Cancel(parse_cancel(body)?),
        PEER_CANCEL_REQUEST => StartupPacket::PeerCancel(parse_cancel(body)?),
        SSL_REQUEST | GSSENC_REQUEST => return Err(StartupError::Malformed("trailing bytes")),
        code if code >> 16 == 3 => StartupPacket::Startup(parse_params(code as u16, body)?),
        code => return Err(StartupError::UnsupportedProtocol(code)),
    };
    Ok(Some(parsed))
}

fn parse_cancel(mut body: &[u8]) -> Result<CancelKey, StartupError> {
    if !(8..=260).contains(&body.len()) {
        return Err(StartupError::Malformed("cancel request of the wrong size"));
    }
    let pid = body.get_i32();
    Ok(CancelKey { pid, secret: body.to_vec() })
}

fn parse_params(minor_version: u16, mut body: &[u8]) -> Result<StartupMessage, StartupError> {
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let key = get_cstr(&mut body).ok_or(StartupError::Malformed("unterminated parameter name"))?;
        if key.is_empty() {
            break;
        }
        let value = get_cstr(&mut body).ok_or(StartupError::Malformed("missing parameter value"))?;
        let key = std::str::from_utf8(key).map_err(|_| StartupError::Malformed("parameter name is not UTF-8"))?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::Malformed("parameter value is not UTF-8"))?;
        if key.starts_with("_pq_.") {
            protocol_options.push(key.to_owned());
        } else {
            params.push((key.to_owned(), value.to_owned()));
        }
    }
    if !body.is_empty() {
        return Err(StartupError::Malformed("bytes after the parameter list"));
    }
    Ok(StartupMessage { minor_version, params, protocol_options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&u32::try_from(body.len() + 8).unwrap().to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn startup_message_with_params() {
        let mut buf = packet(196_608, b"user\0app\0database\0shop\0_pq_.x\0\x31\0\0");
        let Some(StartupPacket::Startup(m)) = decode(&mut buf).unwrap() else { panic!() };
        assert_eq!(m.minor_version, 0);
        assert_eq!(m.param("user"), Some("app"));
        assert_eq!(m.param("database"), Some("shop"));
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_owned()]);
        assert!(buf.is_empty());
    }

    #[test]
    fn protocol_3_2_is_accepted_for_negotiation() {
        let mut buf = packet(196_610, b"user\0app\0\0");
        let Some(StartupPacket::Startup(m)) = decode(&mut buf).unwrap() else { panic!() };
        assert_eq!(m.minor_version, 2);
    }

    #[test]
    fn special_codes() {
        assert_eq!(decode(&mut packet(80_877_103, b"")).unwrap(), Some(StartupPacket::SslRequest));
        assert_eq!(decode(&mut packet(80_877_104, b"")).unwrap(), Some(StartupPacket::GssEncRequest));
        let cancel = decode(&mut packet(80_877_102, &[0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
        assert_eq!(cancel, Some(StartupPacket::Cancel(CancelKey { pid: 7, secret: vec![1, 2, 3, 4] })));
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(decode(&mut packet(0x0002_0000, b"")), Err(StartupError::UnsupportedProtocol(0x0002_0000)));
        assert!(matches!(decode(&mut packet(196_608, b"user\0app")), Err(StartupError::Malformed(_))));
        assert!(matches!(decode(&mut packet(80_877_102, &[0, 0])), Err(StartupError::Malformed(_))));
        for len in [0u32, 3, 7, 10_001, u32::MAX] {
            let mut b = BytesMut::from(&len.to_be_bytes()[..]);
            assert_eq!(decode(&mut b), Err(StartupError::BadLength(len)));
        }
    }

    #[test]
    fn waits_for_the_whole_packet() {
        let full = packet(196_608, b"user\0app\0\0");
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert!(decode(&mut buf).unwrap().is_some());
    }
}
