//! Moves bytes between a client and its server connection in both directions at once, reading
//! only what the [`Flow`] and the connection's state need, until the two are at rest.
//!
//! Both directions are pumped from one poll function, so neither side can block the other:
//! a server busy sending a large result still gets the client's next pipelined messages, and
//! a client sending a large COPY still gets the server's notices. Each direction buffers at
//! most [`HIGH_WATER`] bytes before it stops reading, which bounds memory however large the
//! result (a 1 GiB DataRow passes through in pieces, see `protocol::scan`).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

use super::client::{ClientIo, ClientStream};
use super::flow::Flow;
use crate::backend::ServerConn;
use crate::error::Error;
use crate::protocol::framing::{self, Frame};
use crate::protocol::messages::{TxStatus, parse_parameter_status};
use crate::protocol::scan::{Piece, Scanner};

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 << 10;
/// Read in chunks of at least this size.
const READ_CHUNK: usize = 16 << 10;

/// Why the relay stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Client and server are at rest outside a transaction block, and either the server may be
    /// released (transaction mode) or the proxy is shutting down.
    Idle,
    /// The client closed its connection or sent Terminate.
    ClientGone,
}

pub struct RelayOptions<'a> {
    /// Return as soon as the pair is idle (transaction pooling). Otherwise keep relaying until
    /// the client leaves or `shutdown` fires while idle (session pooling).
    pub release_when_idle: bool,
    pub shutdown: &'a CancellationToken,
}

/// Server messages the relay must see whole; all others pass through unread.
fn wanted(tag: u8) -> bool {
    matches!(tag, b'Z' | b'S' | b'G')
}

/// Relays until the pair is idle or the client is gone. `first` is a message already read
/// from the client that is to go to the server first.
pub async fn run<S: ClientIo>(
    client: &mut ClientStream<S>,
    server: &mut ServerConn,
    flow: &mut Flow,
    first: Option<Frame>,
    opts: RelayOptions<'_>,
) -> Result<RelayEnd, Error> {
    let mut pump = Pump::default();
    if let Some(frame) = first {
        flow.on_client(frame.tag());
        pump.to_server.extend_from_slice(frame.as_bytes());
    }
    let shutdown = opts.shutdown.cancelled();
    tokio::pin!(shutdown);
    poll_fn(|cx| pump.poll(cx, client, server, flow, &opts, shutdown.as_mut())).await
}

#[derive(Default)]
struct Pump {
    to_server: BytesMut,
    to_client: BytesMut,
    scanner: Scanner,
    client_done: bool,
    server_closed: bool,
}

impl Pump {
    fn poll<S: ClientIo>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ClientStream<S>,
        server: &mut ServerConn,
        flow: &mut Flow,
        opts: &RelayOptions<'_>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Result<RelayEnd, Error>> {
        loop {
            self.take_client_frames(client, flow)?;
            self.take_server_messages(server, flow)?;
            if self.client_done {
                return Poll::Ready(Ok(RelayEnd::ClientGone));
            }
            let mut progress =
                write_some(cx, &mut client.io, &mut self.to_client).map_err(Error::ClientIo)?;
            progress |= write_some(cx, &mut server.stream, &mut self.to_server)
                .map_err(|e| lost(server, &e))?;
            let flushed = self.to_client.is_empty() && self.to_server.is_empty();
            if self.server_closed && self.to_client.is_empty() {
                return Poll::Ready(Err(lost(server, &"the server closed the connection")));
            }
            if flushed
                && flow.idle()
                && (opts.release_when_idle || shutdown.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Ok(RelayEnd::Idle));
            }
            if self.to_server.len() < HIGH_WATER {
                match read_some(cx, &mut client.io, &mut client.rbuf) {
                    Poll::Ready(Ok(n)) => {
                        self.client_done = n == 0;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::ClientIo(e))),
                    Poll::Pending => {}
                }
            }
            if self.to_client.len() < HIGH_WATER && !self.server_closed {
                match read_some(cx, &mut server.stream, &mut server.rbuf) {
                    Poll::Ready(Ok(n)) => {
                        self.server_closed = n == 0;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(lost(server, &e))),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Moves whole client messages to the server's outgoing buffer, noting each in the flow.
    fn take_client_frames<S: ClientIo>(
        &mut self,
        client: &mut ClientStream<S>,
        flow: &mut Flow,
    ) -> Result<(), Error> {
        while self.to_server.len() < HIGH_WATER && !self.client_done {
            let Some(frame) = framing::decode(&mut client.rbuf, client.max_message)? else {
                break;
            };
            if frame.tag() == b'X' {
                self.client_done = true;
                break;
            }
            flow.on_client(frame.tag());
            self.to_server.extend_from_slice(frame.as_bytes());
        }
        Ok(())
    }

    /// Moves server bytes to the client's outgoing buffer, looking inside only the messages
    /// that change the flow or the connection's state.
    fn take_server_messages(
        &mut self,
        server: &mut ServerConn,
        flow: &mut Flow,
    ) -> Result<(), Error> {
        while self.to_client.len() < HIGH_WATER {
            let piece = self
                .scanner
                .next(&server.rbuf, framing_limit(), wanted)
                .map_err(|e| Error::ServerProtocol {
                    server: server.addr.to_string(),
                    what: e.to_string(),
                })?;
            match piece {
                Piece::NeedMore => break,
                Piece::Pass(n) => {
                    self.to_client.extend_from_slice(&server.rbuf[..n]);
                    server.rbuf.advance(n);
                }
                Piece::Message { tag, len } => {
                    let msg = server.rbuf.split_to(len);
                    on_server_message(server, flow, tag, &msg[framing::HEADER_LEN..])?;
                    self.to_client.extend_from_slice(&msg);
                }
            }
        }
        Ok(())
    }
}

fn on_server_message(
    server: &mut ServerConn,
    flow: &mut Flow,
    tag: u8,
    body: &[u8],
) -> Result<(), Error> {
    match tag {
        b'Z' => {
            let status = body
                .first()
                .copied()
                .and_then(TxStatus::from_byte)
                .ok_or_else(|| Error::ServerProtocol {
                    server: server.addr.to_string(),
                    what: "malformed ReadyForQuery".into(),
                })?;
            server.status = status;
            flow.on_server(tag, Some(status));
        }
        b'S' => {
            if let Some((name, value)) = parse_parameter_status(body) {
                server.set_param(name, value);
            }
        }
        _ => flow.on_server(tag, None),
    }
    Ok(())
}

/// The messages the relay reads whole from a server are small; this bounds them.
fn framing_limit() -> usize {
    1 << 20
}

fn lost(server: &ServerConn, reason: &dyn std::fmt::Display) -> Error {
    Error::ServerLost {
        server: server.addr.to_string(),
        reason: reason.to_string(),
    }
}

/// Writes what it can without waiting; true if any byte was written.
fn write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
) -> io::Result<bool> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(wrote),
        }
    }
    if wrote {
        // Plain TCP flushes nothing; a TLS stream pushes its last record out here.
        if let Poll::Ready(Err(e)) = Pin::new(w).poll_flush(cx) {
            return Err(e);
        }
    }
    Ok(wrote)
}

fn read_some<R: tokio::io::AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(READ_CHUNK);
    }
    poll_read_buf(Pin::new(r), cx, buf)
}
