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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

use super::client::{ClientIo, ClientStream};
use super::flow::Flow;
use super::prepared::{self, ClientStatements, Disposition, Exchange, Registry};
use crate::backend::ServerConn;
use crate::error::Error;
use crate::protocol::framing::{self, Frame};
use crate::protocol::messages::{self, TxStatus, parse_parameter_status};
use crate::protocol::scan::{Piece, Scanner};
use crate::router::hint;
use crate::telemetry::{DatabaseMetrics, RouteLabel};

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 << 10;
/// Read in chunks of at least this size.
const READ_CHUNK: usize = 16 << 10;
/// The server messages the relay reads whole (ReadyForQuery, ParameterStatus, COPY responses,
/// errors during COPY) are small; this bounds them.
const SERVER_CONTROL_MAX: usize = 1 << 20;

/// Why the relay stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// At rest, the client sent a Query the proxy answers itself (`intercept`), or a COMMIT
    /// (`intercept_commit`); the server stays attached.
    Intercepted(Frame),
    /// Client and server are at rest outside a transaction block, and either the server may be
    /// released (transaction mode) or the proxy is shutting down.
    Idle,
    /// The client closed its connection or sent Terminate.
    ClientGone {
        /// The client said goodbye with Terminate (rather than just closing the socket), so
        /// whatever it sent before should still run.
        terminated: bool,
        /// Part of a message may have been written to the server: the connection is unusable.
        server_dirty: bool,
    },
}

pub struct RelayOptions<'a> {
    /// Return as soon as the pair is idle (transaction pooling). Otherwise keep relaying until
    /// the client leaves or `shutdown` fires while idle (session pooling).
    pub release_when_idle: bool,
    pub shutdown: &'a CancellationToken,
    /// Query texts the proxy answers itself (given the client's named statements); only
    /// taken when everything before them has been answered, so the answer cannot overtake
    /// the server's.
    pub intercept: fn(&[u8], Option<&ClientStatements>) -> bool,
    /// While set, a lone COMMIT (simple, or the Parse of an extended one) is intercepted too:
    /// the session commits a transaction with DDL for every shard itself.
    pub intercept_commit: Option<&'a AtomicBool>,
    /// Named prepared statements are renamed (transaction pooling), or passed through.
    pub renaming: Option<Renaming<'a>>,
    /// Sees every client message that carries or runs a statement (Query, Parse, Bind,
    /// FunctionCall) before it goes on (transaction pooling notes what each statement does to
    /// the session), and may replace it (a statement for another shard).
    /// Told whether the message is one of the request the session routed (`first` of `run`).
    pub observe: Option<&'a mut Observer<'a>>,
    /// Where each answered request is counted, with its latency.
    pub metrics: Option<(&'a DatabaseMetrics, RouteLabel)>,
}

/// Sees a client message of type Q, P, B or F before it is relayed (and whether routing saw
/// it already); returns a replacement, if any.
pub type Observer<'a> = dyn FnMut(&Frame, bool) -> Option<Frame> + Send + 'a;

/// Relays until the pair is idle or the client is gone. `first` are messages already read
/// from the client that go to the server first. `exchange` keeps the replies owed while
/// statements are renamed (it is left empty, its allocations kept for the next relay).
pub async fn run<S: ClientIo>(
    client: &mut ClientStream<S>,
    server: &mut ServerConn,
    flow: &mut Flow,
    exchange: &mut Exchange,
    first: impl IntoIterator<Item = Frame>,
    mut opts: RelayOptions<'_>,
) -> Result<RelayEnd, Error> {
    // the connection's buffers, so relaying a request allocates nothing once they have grown
    let (to_server, to_client) = server.take_buffers();
    let mut pump = Pump {
        to_server,
        to_client,
        scanner: Scanner::default(),
        client_eof: false,
        terminated: false,
        gated: false,
        server_closed: false,
        exchange,
        client_flush: false,
        server_flush: false,
        received: 0,
        sent: 0,
        client_waits: false,
    };
    for frame in first {
        pump.forward(frame, flow, server, &mut opts, true);
    }
    // only session pooling waits for it (transaction pooling returns whenever idle)
    let shutdown = (!opts.release_when_idle).then(|| opts.shutdown.cancelled());
    tokio::pin!(shutdown);
    let end = poll_fn(|cx| pump.poll(cx, client, server, flow, &mut opts, shutdown.as_mut())).await;
    if let Some((metrics, _)) = opts.metrics {
        metrics.relayed(pump.received, pump.sent);
    }
    pump.exchange.clear();
    server.keep_buffers(pump.to_server, pump.to_client);
    end
}

/// Named prepared statements under transaction pooling (see `prepared`): the registry and
/// the client's statements. `None` passes statements through untouched (session pooling).
pub struct Renaming<'a> {
    pub registry: &'a Registry,
    pub client: &'a mut ClientStatements,
}

/// Reads and discards server output until every request is answered, for a client that has
/// left after sending Terminate: what it sent still runs, as it would on PostgreSQL.
pub async fn drain(server: &mut ServerConn, flow: &mut Flow, limit: Duration) -> bool {
    let mut scanner = Scanner::default();
    let work = async {
        while !flow.at_rest() {
            match scanner.next(&server.rbuf, SERVER_CONTROL_MAX, |t| t == b'S' || flow.watches(t)) {
                Ok(Piece::NeedMore) => match server.stream.read_buf(&mut server.rbuf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                },
                Ok(Piece::Pass(n)) => server.rbuf.advance(n),
                Ok(Piece::Message { tag, len }) => {
                    let msg = server.rbuf.split_to(len);
                    if on_server_message(server, flow, tag, &msg[framing::HEADER_LEN..]).is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        scanner.at_boundary()
    };
    crate::timer::timeout(limit, work).await.unwrap_or(false)
}

struct Pump<'x> {
    to_server: BytesMut,
    to_client: BytesMut,
    scanner: Scanner,
    client_eof: bool,
    terminated: bool,
    /// The client's next message starts a new request, held back until this one is done.
    gated: bool,
    server_closed: bool,
    /// Replies owed, and statement renaming (transaction pooling); the session's, so its
    /// allocations are reused from one relay to the next.
    exchange: &'x mut Exchange,
    /// A write went out and its flush has not completed yet (matters for TLS streams).
    client_flush: bool,
    server_flush: bool,
    /// Bytes relayed from the client, and to it.
    received: u64,
    sent: u64,
    /// The client's last read came back Pending (in an earlier poll, too): this task is
    /// woken when the client sends more.
    client_waits: bool,
}

impl Pump<'_> {
    fn poll<S: ClientIo>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ClientStream<S>,
        server: &mut ServerConn,
        flow: &mut Flow,
        opts: &mut RelayOptions<'_>,
        mut shutdown: Pin<&mut Option<impl Future<Output = ()>>>,
    ) -> Poll<Result<RelayEnd, Error>> {
        // A side whose read came back Pending has this task's waker registered: reading it
        // again before this poll returns would only register the waker again. A side whose
        // read was short is drained: tokio then knows it is not ready, so it is read again
        // only before this poll returns Pending (to register the waker), not at once. A
        // client that was waiting at the last poll counts as drained: the poll the server's
        // answer wakes usually ends with the pair idle, and the session reads the client
        // next anyway.
        let (mut client_waits, mut server_waits) = (false, false);
        let (mut client_drained, mut server_drained) = (self.client_waits, false);
        loop {
            if let Some(frame) = self.take_intercepted(client, flow, opts)? {
                return Poll::Ready(Ok(RelayEnd::Intercepted(frame)));
            }
            self.take_client_frames(client, server, flow, opts)?;
            self.take_server_messages(server, flow, &mut opts.renaming, opts.metrics)?;
            if self.terminated && self.to_server.is_empty() {
                return Poll::Ready(Ok(RelayEnd::ClientGone { terminated: true, server_dirty: false }));
            }
            // Everything either side has ready is read before anything is written, so one
            // write carries a whole answer (up to its ReadyForQuery) or a full buffer, not one
            // write per read. Reads cost no system call once tokio knows a socket is drained.
            let mut read = false;
            if !client_waits
                && !client_drained
                && self.to_server.len() < HIGH_WATER
                && !self.terminated
                && !self.gated
                && !self.client_eof
            {
                self.client_waits = false;
                match read_some(cx, &mut client.io, &mut client.rbuf) {
                    Poll::Ready(Ok((n, short))) => {
                        self.client_eof = n == 0;
                        read = n > 0;
                        client_drained = short;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::ClientIo(e))),
                    Poll::Pending => (client_waits, self.client_waits) = (true, true),
                }
            }
            if !server_waits && !server_drained && self.to_client.len() < HIGH_WATER && !self.server_closed {
                match read_some(cx, &mut server.stream, &mut server.rbuf) {
                    Poll::Ready(Ok((n, short))) => {
                        self.server_closed = n == 0;
                        read = true;
                        server_drained = short;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(lost(server, &e))),
                    Poll::Pending => server_waits = true,
                }
            }
            if read {
                continue;
            }
            let mut wrote =
                write_some(cx, &mut client.io, &mut self.to_client, &mut self.client_flush).map_err(Error::ClientIo)?;
            wrote |= write_some(cx, &mut server.stream, &mut self.to_server, &mut self.server_flush)
                .map_err(|e| lost(server, &e))?;
            if self.client_eof {
                // what the client sent before it left went out above, as far as it could
                let server_dirty = !self.to_server.is_empty();
                return Poll::Ready(Ok(RelayEnd::ClientGone { terminated: self.terminated, server_dirty }));
            }
            if self.server_closed && self.to_client.is_empty() {
                return Poll::Ready(Err(lost(server, &"the server closed the connection")));
            }
            let settled = self.to_client.is_empty()
                && self.to_server.is_empty()
                && !self.client_flush
                && self.scanner.at_boundary()
                && server.rbuf.is_empty();
            if settled
                && flow.idle()
                && (opts.release_when_idle || shutdown.as_mut().as_pin_mut().is_some_and(|s| s.poll(cx).is_ready()))
            {
                return Poll::Ready(Ok(RelayEnd::Idle));
            }
            // With both sides waiting for the runtime, another pass can only find what this one
            // found: a write frees buffer room only for a side that was not read for lack of it.
            if !wrote || (client_waits && server_waits) {
                if client_drained || server_drained {
                    // about to sleep: read the drained sides once more, so they wake this task
                    (client_drained, server_drained) = (false, false);
                    continue;
                }
                return Poll::Pending;
            }
        }
    }

    /// The next client message, if it is a Query to intercept and nothing is in flight.
    fn take_intercepted<S: ClientIo>(
        &mut self,
        client: &mut ClientStream<S>,
        flow: &Flow,
        opts: &RelayOptions<'_>,
    ) -> Result<Option<Frame>, Error> {
        let quiet = flow.at_rest() && self.to_server.is_empty() && self.to_client.is_empty() && !self.client_flush;
        let commits = opts.intercept_commit.is_some_and(|flag| flag.load(Ordering::Relaxed));
        let tag = client.rbuf.first().copied();
        if !quiet || !(tag == Some(b'Q') || (commits && tag == Some(b'P'))) {
            return Ok(None);
        }
        let Some((_, len)) = framing::peek_header(&client.rbuf, client.max_message)? else {
            return Ok(None);
        };
        if client.rbuf.len() < len {
            return Ok(None);
        }
        let body = &client.rbuf[framing::HEADER_LEN..len];
        let wanted = match tag {
            Some(b'Q') => messages::query_text(body).is_some_and(|sql| {
                (opts.intercept)(sql, opts.renaming.as_ref().map(|r| &*r.client)) || (commits && hint::is_commit(sql))
            }),
            _ => messages::parse_parse(body).is_some_and(|(_, sql)| hint::is_commit(sql)),
        };
        if !wanted {
            return Ok(None);
        }
        Ok(framing::decode(&mut client.rbuf, client.max_message)?)
    }

    /// Sends one client message on, noting it in the flow and renaming statements if asked.
    fn forward(
        &mut self,
        frame: Frame,
        flow: &mut Flow,
        server: &mut ServerConn,
        opts: &mut RelayOptions<'_>,
        routed: bool,
    ) {
        flow.on_client(frame.tag());
        self.received += frame.as_bytes().len() as u64;
        let replaced = match opts.observe.as_mut() {
            Some(observe) if matches!(frame.tag(), b'Q' | b'P' | b'B' | b'F') => observe(&frame, routed),
            _ => None,
        };
        let frame = replaced.unwrap_or(frame);
        match &mut opts.renaming {
            Some(r) => {
                let mut ctx =
                    prepared::Context { registry: r.registry, client: r.client, server: &mut server.statements };
                self.exchange.client_frame(frame, &mut ctx, &mut self.to_server, &mut self.to_client);
            }
            None => self.to_server.extend_from_slice(frame.as_bytes()),
        }
    }

    /// Moves whole client messages to the server's outgoing buffer, noting each in the flow.
    fn take_client_frames<S: ClientIo>(
        &mut self,
        client: &mut ClientStream<S>,
        server: &mut ServerConn,
        flow: &mut Flow,
        opts: &mut RelayOptions<'_>,
    ) -> Result<(), Error> {
        self.gated = false;
        while self.to_server.len() < HIGH_WATER && !self.terminated {
            if opts.release_when_idle && !may_forward(client.rbuf.first().copied(), flow) {
                // the next request must be routed on its own once this one is answered
                self.gated = true;
                break;
            }
            let Some(frame) = framing::decode(&mut client.rbuf, client.max_message)? else {
                break;
            };
            match frame.tag() {
                b'X' => self.terminated = true,
                tag if is_frontend_tag(tag) => self.forward(frame, flow, server, opts, false),
                tag => return Err(unexpected_message(tag)),
            }
        }
        Ok(())
    }

    /// Moves server bytes to the client's outgoing buffer, looking inside only the messages
    /// that change the flow or the connection's state.
    fn take_server_messages(
        &mut self,
        server: &mut ServerConn,
        flow: &mut Flow,
        renaming: &mut Option<Renaming<'_>>,
        metrics: Option<(&DatabaseMetrics, RouteLabel)>,
    ) -> Result<(), Error> {
        if server.rbuf.is_empty() {
            // most calls: nothing read since the last one
            return Ok(());
        }
        // The read buffer is taken out while its messages are handled, so a message is a
        // slice of it: splitting it off instead made the buffer shared and cost atomic
        // reference counting per message.
        let mut rbuf = std::mem::take(&mut server.rbuf);
        let result = self.take_server_messages_from(&mut rbuf, server, flow, renaming, metrics);
        server.rbuf = rbuf;
        result
    }

    fn take_server_messages_from(
        &mut self,
        rbuf: &mut BytesMut,
        server: &mut ServerConn,
        flow: &mut Flow,
        renaming: &mut Option<Renaming<'_>>,
        metrics: Option<(&DatabaseMetrics, RouteLabel)>,
    ) -> Result<(), Error> {
        let renames = renaming.is_some();
        while self.to_client.len() < HIGH_WATER {
            let exchange = &mut self.exchange;
            let piece = self
                .scanner
                .next(rbuf, SERVER_CONTROL_MAX, |t| t == b'S' || flow.watches(t) || (renames && !exchange.pass(t)))
                .map_err(|e| Error::ServerProtocol { server: server.addr.to_string(), what: e.to_string() })?;
            match piece {
                Piece::NeedMore => break,
                Piece::Pass(n) => {
                    self.sent += n as u64;
                    self.to_client.extend_from_slice(&rbuf[..n]);
                    rbuf.advance(n);
                }
                Piece::Message { tag, len } => {
                    let msg = &rbuf[..len];
                    let body = &msg[framing::HEADER_LEN..];
                    let mut disposition = Disposition::Forward;
                    if let Some(r) = renaming.as_mut()
                        && self.exchange.watches(tag)
                    {
                        let mut ctx = prepared::Context {
                            registry: r.registry,
                            client: r.client,
                            server: &mut server.statements,
                        };
                        disposition = self.exchange.server_message(tag, body, &mut ctx);
                    }
                    on_server_message(server, flow, tag, body)?;
                    if let Some((metrics, route)) = metrics
                        && let Some(took) = flow.take_answered()
                    {
                        metrics.query(route, took);
                        if flow.status() == TxStatus::Idle {
                            metrics.transaction();
                        }
                    }
                    if disposition == Disposition::Forward {
                        self.sent += len as u64;
                        self.to_client.extend_from_slice(msg);
                    }
                    rbuf.advance(len);
                    self.exchange.emit_due(&mut self.to_client);
                }
            }
        }
        Ok(())
    }
}

/// In transaction pooling, whether the client's next message (type `tag`) may follow the
/// current request to this server. A new request outside a transaction block must be routed
/// on its own (it may need another server), so it waits until the pair is idle; COPY data,
/// the rest of an unfinished extended batch, and everything inside a transaction block go on.
fn may_forward(tag: Option<u8>, flow: &Flow) -> bool {
    matches!(tag, None | Some(b'd' | b'c' | b'f' | b'X')) || flow.unsynced() || flow.status() != TxStatus::Idle
}

/// The message types a client may send after login (PostgreSQL docs, "Message Formats").
#[must_use]
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X')
}

/// A message type no client may send now; answered by the proxy, never forwarded.
#[must_use]
pub fn unexpected_message(tag: u8) -> Error {
    Error::Protocol(format!("invalid frontend message type {tag} ('{}')", tag.escape_ascii()))
}

fn on_server_message(server: &mut ServerConn, flow: &mut Flow, tag: u8, body: &[u8]) -> Result<(), Error> {
    match tag {
        b'Z' => {
            let status = body.first().copied().and_then(TxStatus::from_byte).ok_or_else(|| Error::ServerProtocol {
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

fn lost(server: &ServerConn, reason: &dyn std::fmt::Display) -> Error {
    Error::ServerLost { server: server.addr.to_string(), reason: reason.to_string() }
}

/// Writes what it can without waiting, then flushes; true if any byte was written.
/// `needs_flush` remembers a flush that could not finish yet (TLS), so it is retried.
fn write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
    needs_flush: &mut bool,
) -> io::Result<bool> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
                *needs_flush = true;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    if *needs_flush {
        match Pin::new(w).poll_flush(cx) {
            Poll::Ready(Ok(())) => *needs_flush = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(wrote)
}

fn read_some<R: tokio::io::AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<io::Result<(usize, bool)>> {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(READ_CHUNK);
    }
    let spare = buf.capacity() - buf.len();
    poll_read_buf(Pin::new(r), cx, buf).map_ok(|n| (n, n < spare))
}
