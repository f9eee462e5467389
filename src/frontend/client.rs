//! The client's socket with its read buffer: reads the startup packet and whole frames
//! (bounded by `max_message_size`), writes messages. Generic over the stream so TLS streams
//! and in-memory duplex pipes work the same way.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::protocol::framing::{self, Frame};
use crate::protocol::messages::{self, Severity};
use crate::protocol::startup::{self, StartupPacket};

/// What a client connection must be: a byte stream pgrouter can own and move between tasks.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo for T {}

/// A new client's read buffer: enough for its startup packet and login. Idle clients are
/// most of a proxy's clients, so the buffer grows only when requests come.
const INITIAL_BUFFER: usize = 512;
/// A read needs at least this much free room (or the rest of the message being read), else
/// the buffer grows by [`READ_GROWTH`] (or that rest): a login never grows the buffer.
const READ_ROOM: usize = 256;
const READ_GROWTH: usize = 4096;

pub struct ClientStream<S> {
    pub(crate) io: S,
    pub(crate) rbuf: BytesMut,
    pub(crate) max_message: usize,
}

impl<S: ClientIo> ClientStream<S> {
    pub fn new(io: S, max_message: usize) -> Self {
        Self { io, rbuf: BytesMut::with_capacity(INITIAL_BUFFER), max_message }
    }

    /// The next startup packet; `None` if the client closed the connection first.
    pub async fn read_startup(&mut self) -> Result<Option<StartupPacket>, Error> {
        loop {
            if let Some(packet) = startup::decode(&mut self.rbuf).map_err(|e| Error::Protocol(e.to_string()))? {
                return Ok(Some(packet));
            }
            if !self.fill(0).await? {
                return Ok(None);
            }
        }
    }

    /// The next whole message; `None` if the client closed the connection between messages.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            if let Some(frame) = framing::decode(&mut self.rbuf, self.max_message)? {
                return Ok(Some(frame));
            }
            // decode checked the length against max_message
            let rest = framing::peek_header(&self.rbuf, self.max_message)?.map_or(0, |(_, len)| len - self.rbuf.len());
            if !self.fill(rest).await? {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Protocol("connection closed in the middle of a message".into()));
            }
        }
    }

    /// Resolves when the client closes its side (or its connection fails), with whether it
    /// said goodbye first (a Terminate among the buffered messages). Bytes that arrive
    /// meanwhile are kept for later, up to one maximal message; beyond that reading pauses.
    pub async fn closed(&mut self) -> bool {
        while self.rbuf.len() <= self.max_message + framing::HEADER_LEN {
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return self.buffered_terminate(),
                Ok(_) => {}
            }
        }
        std::future::pending::<bool>().await
    }

    /// True if a whole Terminate message is among the buffered messages.
    fn buffered_terminate(&self) -> bool {
        let mut rest = &self.rbuf[..];
        while let Ok(Some((tag, len))) = framing::peek_header(rest, usize::MAX >> 1) {
            if len > rest.len() {
                break;
            }
            if tag == b'X' {
                return true;
            }
            rest = &rest[len..];
        }
        false
    }

    /// Reads more bytes, with room for at least `rest` (what the message being read still
    /// lacks); false at end of stream.
    async fn fill(&mut self, rest: usize) -> Result<bool, Error> {
        if self.rbuf.capacity() - self.rbuf.len() < rest.max(READ_ROOM) {
            self.rbuf.reserve(rest.max(READ_GROWTH));
        }
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(Error::ClientIo(e)),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.io.write_all(bytes).await.map_err(Error::ClientIo)?;
        self.io.flush().await.map_err(Error::ClientIo)
    }

    /// Tells the client about an error; a client that is already gone is not an error.
    pub async fn send_error(&mut self, severity: Severity, err: &Error) {
        let _ = self.send(&messages::error_response(severity, err.sqlstate(), &err.to_string())).await;
    }
}
