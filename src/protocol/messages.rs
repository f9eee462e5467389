//! Builders for the messages pgrouter writes itself, and typed views of the few messages it
//! must read. Everything else is forwarded as raw frames and never decoded here.
//!
//! Encoding uses `pgwire`'s message types: these are off the hot path (startup, auth, errors),
//! where its decode/encode cost does not matter.

use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{CommandComplete, ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};

use super::framing::get_cstr;
use super::startup::CancelKey;
use crate::error::SqlState;

/// Transaction status from ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

impl TxStatus {
    #[must_use]
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    fn wire(self) -> TransactionStatus {
        match self {
            Self::Idle => TransactionStatus::Idle,
            Self::InTransaction => TransactionStatus::Transaction,
            Self::Failed => TransactionStatus::Error,
        }
    }
}

/// ErrorResponse severity: `Error` ends the statement, `Fatal` ends the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
        }
    }
}

fn encode(msg: &impl Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    msg.encode(&mut buf).expect("messages built by pgrouter are within pgwire's size limits");
    buf.freeze()
}

#[must_use]
pub fn error_response(severity: Severity, code: SqlState, message: &str) -> Bytes {
    let sev = severity.as_str().to_owned();
    encode(&ErrorResponse::new(vec![
        (b'S', sev.clone()),
        (b'V', sev),
        (b'C', code.0.to_owned()),
        (b'M', message.to_owned()),
    ]))
}

#[must_use]
pub fn ready_for_query(status: TxStatus) -> Bytes {
    encode(&ReadyForQuery::new(status.wire()))
}

#[must_use]
pub fn parameter_status(name: &str, value: &str) -> Bytes {
    encode(&ParameterStatus::new(name.to_owned(), value.to_owned()))
}

#[must_use]
pub fn backend_key_data(key: &CancelKey) -> Bytes {
    let secret = match <[u8; 4]>::try_from(key.secret.as_slice()) {
        Ok(four) => SecretKey::I32(i32::from_be_bytes(four)),
        Err(_) => SecretKey::Bytes(Bytes::copy_from_slice(&key.secret)),
    };
    encode(&BackendKeyData::new(key.pid, secret))
}

#[must_use]
pub fn command_complete(tag: &str) -> Bytes {
    encode(&CommandComplete::new(tag.to_owned()))
}

/// A whole text result set (RowDescription, DataRows, CommandComplete) for answers pgrouter
/// gives itself (`SHOW pgrouter.route`, later the admin console). All columns are `text`.
#[must_use]
pub fn text_result(columns: &[&str], rows: &[Vec<Option<String>>], tag: &str) -> Bytes {
    const TEXT_OID: u32 = 25;
    let fields = columns.iter().map(|c| FieldDescription::new((*c).to_owned(), 0, 0, TEXT_OID, -1, -1, 0)).collect();
    let mut out = BytesMut::from(&encode(&RowDescription::new(fields))[..]);
    for row in rows {
        let mut data = BytesMut::new();
        for value in row {
            match value {
                Some(v) => {
                    data.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
                    data.extend_from_slice(v.as_bytes());
                }
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(&encode(&DataRow::new(data, i16::try_from(row.len()).unwrap_or(i16::MAX))));
    }
    out.extend_from_slice(&command_complete(tag));
    out.freeze()
}

/// A NoticeResponse ('N') with one message, e.g. PostgreSQL's warnings.
#[must_use]
pub fn notice(code: SqlState, message: &str) -> Bytes {
    let mut buf = BytesMut::new();
    let fields: Vec<(u8, &str)> = vec![(b'S', "WARNING"), (b'V', "WARNING"), (b'C', code.0), (b'M', message)];
    let len: usize = 4 + fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1;
    buf.extend_from_slice(b"N");
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for (kind, value) in fields {
        buf.extend_from_slice(&[kind]);
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\0");
    }
    buf.extend_from_slice(b"\0");
    buf.freeze()
}

/// The SQL text of a Query message body.
#[must_use]
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let mut b = body;
    get_cstr(&mut b)
}

/// A Parse body: statement name and SQL text.
#[must_use]
pub fn parse_parse(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut b = body;
    let name = get_cstr(&mut b)?;
    let sql = get_cstr(&mut b)?;
    Some((name, sql))
}

/// The parameter type OIDs a Parse body declares (0: unspecified).
#[must_use]
pub fn parse_param_types(body: &[u8]) -> Option<Vec<u32>> {
    let mut b = body;
    get_cstr(&mut b)?;
    get_cstr(&mut b)?;
    let n = usize::try_from(read_i16(&mut b)?).ok()?;
    (0..n)
        .map(|_| {
            let oid = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
            b = &b[4..];
            Some(oid)
        })
        .collect()
}

/// Whether the part of a Parse body after its two strings (`rest`) declares exactly the
/// parameter types `types` (no allocation).
#[must_use]
pub fn parse_param_types_eq(rest: &[u8], types: &[u32]) -> bool {
    let mut b = rest;
    let Some(n) = read_i16(&mut b).and_then(|n| usize::try_from(n).ok()) else {
        return false;
    };
    n == types.len()
        && b.len() >= 4 * n
        && b.chunks_exact(4).zip(types).all(|(oid, t)| u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]) == *t)
}

/// A Parse body.
#[must_use]
pub fn parse_body(name: &[u8], sql: &str, types: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + sql.len() + 4 + types.len() * 4);
    out.extend_from_slice(name);
    out.push(0);
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out.extend_from_slice(&i16::try_from(types.len()).unwrap_or(i16::MAX).to_be_bytes());
    for oid in types {
        out.extend_from_slice(&oid.to_be_bytes());
    }
    out
}

/// The parts of a Bind body after its names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindView<'a> {
    /// Parameter format codes as sent: none (all text), one (for all), or one per parameter.
    pub param_formats: Vec<i16>,
    /// Parameter values; None is NULL.
    pub values: Vec<Option<&'a [u8]>>,
    /// Result column format codes, in the same scheme.
    pub result_formats: Vec<i16>,
}

impl BindView<'_> {
    /// The Bind body for `portal` and `statement` with these parts.
    #[must_use]
    pub fn encode(&self, portal: &[u8], statement: &[u8]) -> Vec<u8> {
        let count = |n: usize| i16::try_from(n).unwrap_or(i16::MAX).to_be_bytes();
        let mut out = Vec::new();
        for name in [portal, statement] {
            out.extend_from_slice(name);
            out.push(0);
        }
        out.extend_from_slice(&count(self.param_formats.len()));
        self.param_formats.iter().for_each(|f| out.extend_from_slice(&f.to_be_bytes()));
        out.extend_from_slice(&count(self.values.len()));
        for value in &self.values {
            match value {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
        out.extend_from_slice(&count(self.result_formats.len()));
        self.result_formats.iter().for_each(|f| out.extend_from_slice(&f.to_be_bytes()));
        out
    }
}

/// Reads a Bind body.
#[must_use]
pub fn parse_bind(body: &[u8]) -> Option<BindView<'_>> {
    let mut rest = body;
    get_cstr(&mut rest)?;
    get_cstr(&mut rest)?;
    let param_formats = read_i16s(&mut rest)?;
    let n = usize::try_from(read_i16(&mut rest)?).ok()?;
    let values = read_values(&mut rest, n)?;
    let result_formats = read_i16s(&mut rest)?;
    Some(BindView { param_formats, values, result_formats })
}

/// The column values of a DataRow body; None is NULL.
#[must_use]
pub fn data_row_values(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut rest = body;
    let n = usize::try_from(read_i16(&mut rest)?).ok()?;
    read_values(&mut rest, n)
}

fn read_i16(rest: &mut &[u8]) -> Option<i16> {
    let v = i16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    *rest = &rest[2..];
    Some(v)
}

/// A count, then that many int16s.
fn read_i16s(rest: &mut &[u8]) -> Option<Vec<i16>> {
    let n = usize::try_from(read_i16(rest)?).ok()?;
    (0..n).map(|_| read_i16(rest)).collect()
}

/// `n` length-prefixed values (length -1: NULL), as in Bind and DataRow.
fn read_values<'a>(rest: &mut &'a [u8], n: usize) -> Option<Vec<Option<&'a [u8]>>> {
    let mut values = Vec::with_capacity(n.min(rest.len() / 4));
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        *rest = &rest[4..];
        if len < 0 {
            values.push(None);
        } else {
            let len = usize::try_from(len).ok()?;
            values.push(Some(rest.get(..len)?));
            *rest = &rest[len..];
        }
    }
    Some(values)
}

/// A Bind body: portal name and statement name.
#[must_use]
pub fn parse_bind_names(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut b = body;
    let portal = get_cstr(&mut b)?;
    let statement = get_cstr(&mut b)?;
    Some((portal, statement))
}

#[must_use]
pub fn negotiate_protocol_version(newest_minor: u16, unsupported: &[String]) -> Bytes {
    encode(&NegotiateProtocolVersion::new(i32::from(newest_minor), unsupported.to_vec()))
}

/// The authentication requests pgrouter sends to clients.
pub mod auth {
    use super::{Authentication, Bytes, encode};

    #[must_use]
    pub fn ok() -> Bytes {
        encode(&Authentication::Ok)
    }

    #[must_use]
    pub fn sasl(mechanisms: &[&str]) -> Bytes {
        encode(&Authentication::SASL(mechanisms.iter().map(|m| (*m).to_owned()).collect()))
    }

    #[must_use]
    pub fn sasl_continue(data: &[u8]) -> Bytes {
        encode(&Authentication::SASLContinue(Bytes::copy_from_slice(data)))
    }

    #[must_use]
    pub fn sasl_final(data: &[u8]) -> Bytes {
        encode(&Authentication::SASLFinal(Bytes::copy_from_slice(data)))
    }

    #[must_use]
    pub fn md5(salt: [u8; 4]) -> Bytes {
        encode(&Authentication::MD5Password(salt.to_vec()))
    }
}

/// A Query message ('Q') with one SQL string.
#[must_use]
pub fn query(sql: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(sql.len() + 6);
    buf.extend_from_slice(b"Q");
    buf.extend_from_slice(&u32::try_from(sql.len() + 5).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(sql.as_bytes());
    buf.extend_from_slice(b"\0");
    buf.freeze()
}

/// Terminate ('X').
pub const TERMINATE: &[u8] = &[b'X', 0, 0, 0, 4];

/// Reads a ParameterStatus body: name and value.
#[must_use]
pub fn parse_parameter_status(mut body: &[u8]) -> Option<(String, String)> {
    let name = get_cstr(&mut body)?;
    let value = get_cstr(&mut body)?;
    Some((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()))
}

/// Reads a DataRow body as text columns (`None` for NULL).
#[must_use]
pub fn parse_data_row(mut body: &[u8]) -> Option<Vec<Option<String>>> {
    if body.len() < 2 {
        return None;
    }
    let count = body.get_u16();
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            columns.push(None);
            continue;
        }
        let value = body.get(..usize::try_from(len).ok()?)?;
        columns.push(Some(String::from_utf8_lossy(value).into_owned()));
        body.advance(value.len());
    }
    Some(columns)
}

/// The fields of an ErrorResponse or NoticeResponse worth logging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

#[must_use]
pub fn parse_error_fields(mut body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        body = rest;
        let Some(value) = get_cstr(&mut body) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
    fields
}

/// A client's answer to an authentication request (all use message type 'p'; which one it
/// is depends on what was asked).
pub mod password {
    use super::{Buf, get_cstr};

    /// PasswordMessage: a NUL-terminated string (cleartext or md5 response).
    #[must_use]
    pub fn parse_password(mut body: &[u8]) -> Option<&[u8]> {
        let pw = get_cstr(&mut body)?;
        body.is_empty().then_some(pw)
    }

    /// SASLInitialResponse: mechanism name, then an int32 length (-1 = none) and the data.
    #[must_use]
    pub fn parse_sasl_initial(mut body: &[u8]) -> Option<(&[u8], &[u8])> {
        let mechanism = get_cstr(&mut body)?;
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        let data = if len < 0 { &[][..] } else { body.get(..usize::try_from(len).ok()?)? };
        (body.len() == data.len()).then_some((mechanism, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing;

    #[test]
    fn error_response_round_trips() {
        let bytes = error_response(Severity::Fatal, SqlState::INVALID_PASSWORD, "nope");
        let frame = framing::decode(&mut BytesMut::from(&bytes[..]), 1024).unwrap().unwrap();
        assert_eq!(frame.tag(), b'E');
        let f = parse_error_fields(frame.body());
        assert_eq!((f.severity.as_str(), f.code.as_str(), f.message.as_str()), ("FATAL", "28P01", "nope"));
    }

    #[test]
    fn ready_for_query_bytes() {
        assert_eq!(&ready_for_query(TxStatus::Idle)[..], b"Z\0\0\0\x05I");
        assert_eq!(&ready_for_query(TxStatus::Failed)[..], b"Z\0\0\0\x05E");
    }

    #[test]
    fn query_bytes() {
        assert_eq!(&query("select 1")[..], b"Q\0\0\0\x0dselect 1\0");
    }

    #[test]
    fn text_results_decode() {
        let bytes = text_result(&["a", "b"], &[vec![Some("x".into()), None]], "SHOW");
        let mut buf = BytesMut::from(&bytes[..]);
        let t = framing::decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(t.tag(), b'T');
        let d = framing::decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(parse_data_row(d.body()), Some(vec![Some("x".into()), None]));
        assert_eq!(framing::decode(&mut buf, 1024).unwrap().unwrap().tag(), b'C');
        let n = notice(SqlState("25001"), "already");
        let n = framing::decode(&mut BytesMut::from(&n[..]), 1024).unwrap().unwrap();
        assert_eq!(parse_error_fields(n.body()).code, "25001");
    }

    #[test]
    fn sasl_initial_response() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(password::parse_sasl_initial(&body), Some((&b"SCRAM-SHA-256"[..], &b"abc"[..])));
        body.push(b'x');
        assert_eq!(password::parse_sasl_initial(&body), None);
    }
}
