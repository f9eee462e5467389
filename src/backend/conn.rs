//! One connection to a PostgreSQL server: connect, authenticate as the server asks (SCRAM-SHA-256,
//! md5 or cleartext), remember what the server reported, and a few simple requests the pool
//! needs (reset, rollback, liveness, cancel).
//!
//! The SCRAM client and the message parsers are `postgres-protocol`'s; this file only drives
//! them over a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls::{ServerStream, ServerTlsSettings, negotiate};
use crate::config::ServerAddr;
use crate::error::Error;
use crate::protocol::framing::{self, Frame};
use crate::protocol::messages::{self, TxStatus, parse_error_fields};
use crate::protocol::startup::{CANCEL_REQUEST, CancelKey};

/// Session settings (GUCs) by lower-cased name: what a client asked for, or what is in effect
/// on a server connection beyond its defaults.
pub type Settings = std::collections::BTreeMap<String, String>;

/// Limit for the messages read while connecting and resetting (they are all small).
const CONTROL_MESSAGE_MAX: usize = 1 << 20;

/// Everything needed to open a server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    pub addr: ServerAddr,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
    /// Shown in pg_stat_activity. None for pooled connections: they start as a client that sent
    /// no application_name, so `RESET ALL` gives a client what it would get from PostgreSQL.
    pub application_name: Option<&'static str>,
    /// TLS to the server (`server_tls`), None for plaintext.
    pub tls: Option<Arc<ServerTlsSettings>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An authenticated server connection, ready for queries.
#[derive(Debug)]
pub struct ServerConn {
    pub(crate) stream: ServerStream,
    /// Bytes read from the server and not yet handled.
    pub(crate) rbuf: BytesMut,
    /// The relay's outgoing buffers (to the server, to the client), empty between relays and
    /// kept here so their memory is reused: there are far fewer server connections than
    /// clients.
    buffers: (BytesMut, BytesMut),
    pub addr: ServerAddr,
    /// The server's own cancel key with its address, shared with the cancel registry while
    /// a client's request runs here (so lending the connection copies nothing).
    pub cancel: Arc<CancelTarget>,
    /// The ParameterStatus values the server reported, kept current as it reports changes.
    pub params: Vec<(String, String)>,
    pub status: TxStatus,
    pub id: u64,
    pub created: Instant,
    pub last_used: Instant,
    /// Session-level settings in effect beyond the connection's defaults (source "session").
    /// Shared: equal settings are kept as one copy where they meet (see
    /// `Session::apply_settings`), so the check on every lending compares pointers.
    pub settings: Arc<Settings>,
    /// The proxy-wide prepared statements this connection has (transaction pooling).
    pub statements: super::statements::ServerStatements,
    /// A request of the proxy's own failed midway (timeout, read error): the answer may still
    /// arrive, so the connection must never be reused.
    pub broken: bool,
}

impl ServerConn {
    /// Connects and authenticates, within `spec.connect_timeout`.
    pub async fn connect(spec: &ConnectSpec) -> Result<Self, Error> {
        match crate::timer::timeout(spec.connect_timeout, Self::connect_inner(spec)).await {
            Ok(result) => result,
            Err(_) => Err(connect_error(
                spec,
                format!(
                    "no answer within server_connect_timeout ({})",
                    humantime::format_duration(spec.connect_timeout)
                ),
            )),
        }
    }

    async fn connect_inner(spec: &ConnectSpec) -> Result<Self, Error> {
        let stream = TcpStream::connect((spec.addr.host.as_str(), spec.addr.port))
            .await
            .map_err(|e| connect_error(spec, e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| connect_error(spec, e.to_string()))?;
        let stream =
            negotiate(stream, spec.tls.as_deref(), &spec.addr.host).await.map_err(|e| connect_error(spec, e))?;
        let now = Instant::now();
        let mut conn = Self {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            buffers: (BytesMut::new(), BytesMut::new()),
            addr: spec.addr.clone(),
            cancel: Arc::new(CancelTarget { addr: spec.addr.clone(), key: CancelKey { pid: 0, secret: Vec::new() } }),
            params: Vec::new(),
            status: TxStatus::Idle,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            created: now,
            last_used: now,
            broken: false,
            settings: Arc::default(),
            statements: super::statements::ServerStatements::default(),
        };
        let mut out = BytesMut::new();
        let params = [("user", spec.user.as_str()), ("database", spec.database.as_str())]
            .into_iter()
            .chain(spec.application_name.map(|name| ("application_name", name)));
        frontend::startup_message(params, &mut out).map_err(|e| connect_error(spec, e.to_string()))?;
        conn.send(&out).await.map_err(|e| connect_error(spec, e.to_string()))?;
        conn.authenticate(spec).await?;
        conn.await_ready(spec).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, spec: &ConnectSpec) -> Result<(), Error> {
        let password = || {
            spec.password.as_deref().ok_or_else(|| {
                connect_error(
                    spec,
                    format!("the server asks for a password and none is configured for user \"{}\"", spec.user),
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.read_control(spec).await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut out).map_err(io_to(spec))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        spec.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out).map_err(io_to(spec))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) =
                        fallible_iterator::FallibleIterator::next(&mut mechanisms).map_err(io_to(spec))?
                    {
                        offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(connect_error(
                            spec,
                            "the server offers no SASL mechanism pgrouter supports".into(),
                        ));
                    }
                    let client = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, client.message(), &mut out)
                        .map_err(io_to(spec))?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client =
                        scram.as_mut().ok_or_else(|| protocol_error(spec, "SASL continue without SASL start"))?;
                    client.update(body.data()).map_err(|e| connect_error(spec, format!("SCRAM: {e}")))?;
                    frontend::sasl_response(client.message(), &mut out).map_err(io_to(spec))?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram.as_mut().ok_or_else(|| protocol_error(spec, "SASL final without SASL start"))?;
                    client
                        .finish(body.data())
                        .map_err(|e| connect_error(spec, format!("SCRAM: server signature: {e}")))?;
                    continue;
                }
                _ => return Err(protocol_error(spec, "unsupported authentication request")),
            }
            self.send(&out).await.map_err(io_to(spec))?;
        }
    }

    /// After AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery.
    async fn await_ready(&mut self, spec: &ConnectSpec) -> Result<(), Error> {
        loop {
            match self.read_control(spec).await? {
                Message::ParameterStatus(body) => {
                    let name = body.name().map_err(io_to(spec))?.to_owned();
                    let value = body.value().map_err(io_to(spec))?.to_owned();
                    self.set_param(name, value);
                }
                Message::BackendKeyData(body) => {
                    let key = CancelKey { pid: body.process_id(), secret: body.secret_key().to_be_bytes().to_vec() };
                    self.cancel = Arc::new(CancelTarget { addr: self.addr.clone(), key });
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::NoticeResponse(_) => {}
                _ => return Err(protocol_error(spec, "unexpected message during startup")),
            }
        }
    }

    /// Reads one message during connect; an ErrorResponse becomes a connect error carrying the
    /// server's own message (e.g. "password authentication failed for user ...").
    async fn read_control(&mut self, spec: &ConnectSpec) -> Result<Message, Error> {
        let frame = self.read_frame().await.map_err(|e| connect_error(spec, e))?;
        if frame.tag() == b'E' {
            let f = parse_error_fields(frame.body());
            return Err(connect_error(spec, format!("{} {}: {}", f.severity, f.code, f.message)));
        }
        let mut bytes = BytesMut::from(frame.as_bytes());
        match Message::parse(&mut bytes) {
            Ok(Some(m)) => Ok(m),
            _ => Err(protocol_error(spec, "malformed message")),
        }
    }

    /// Reads one whole (small) message, for control exchanges outside the relay.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(frame) = framing::decode(&mut self.rbuf, CONTROL_MESSAGE_MAX).map_err(|e| e.to_string())? {
                return Ok(frame);
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Records a ParameterStatus value.
    pub fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }

    /// Runs one statement whose result is not wanted (ROLLBACK, DISCARD ALL) and waits for
    /// ReadyForQuery. Fails if the server reports an error or does not answer in `limit`.
    pub async fn run_simple(&mut self, sql: &str, limit: Duration) -> Result<TxStatus, String> {
        self.exchange(sql, limit).await.map(|_| self.status)
    }

    /// Runs a query and returns its rows as text (NULL as `None`), for the proxy's own
    /// questions (health, WAL position, function volatility). Fails on an ErrorResponse.
    pub async fn query_rows(&mut self, sql: &str, limit: Duration) -> Result<Vec<Vec<Option<String>>>, String> {
        self.exchange(sql, limit).await
    }

    /// Sends one Query and reads everything up to its ReadyForQuery. If that cannot be done
    /// (timeout, I/O error, garbage) the connection is marked broken: an answer may still be
    /// on its way, so it must not be lent to anyone.
    async fn exchange(&mut self, sql: &str, limit: Duration) -> Result<Vec<Vec<Option<String>>>, String> {
        let work = async {
            self.send(&messages::query(sql)).await.map_err(|e| e.to_string())?;
            let mut rows = Vec::new();
            let mut error = None;
            loop {
                let frame = self.read_frame().await?;
                let body = frame.body();
                match frame.tag() {
                    b'D' => rows.push(messages::parse_data_row(body).ok_or("malformed DataRow")?),
                    b'E' => error = Some(parse_error_fields(body).message),
                    b'S' => {
                        if let Some((k, v)) = messages::parse_parameter_status(body) {
                            self.set_param(k, v);
                        }
                    }
                    b'Z' => {
                        self.status = body.first().copied().and_then(TxStatus::from_byte).ok_or("bad ReadyForQuery")?;
                        // a clean answer: the server reported the error, the connection is fine
                        return Ok(error.map_or(Ok(rows), Err));
                    }
                    _ => {}
                }
            }
        };
        let outcome = crate::timer::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer to {sql} within {limit:?}")));
        outcome.unwrap_or_else(|dirty| {
            self.broken = true;
            Err(dirty)
        })
    }

    /// Nothing unread, outside a transaction, not known to be broken: what [`Self::is_clean`]
    /// checks before it asks the socket.
    #[must_use]
    pub fn is_settled(&self) -> bool {
        !self.broken && self.rbuf.is_empty() && self.status == TxStatus::Idle
    }

    /// True if the connection can be handed to a client: nothing unread, outside a
    /// transaction, and the server has neither closed it nor sent anything (an idle server
    /// sends nothing unless it is going away).
    ///
    /// The socket is asked (a non-blocking peek) only when tokio's readiness says something
    /// arrived since the last read drained it; otherwise the answer costs no system call.
    /// After a relay the readiness is clear (its last read was short), so lending and
    /// returning a connection per transaction makes no extra call. A close the reactor has
    /// not seen yet passes, as it would pass a peek made a moment earlier: the first request
    /// then finds the connection gone (`ServerLost`).
    pub fn is_clean(&self) -> bool {
        if !self.is_settled() {
            return false;
        }
        let tcp = self.stream.tcp();
        let peek = || {
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            socket2::SockRef::from(tcp).peek(&mut probe)
        };
        // WouldBlock: either tokio knows nothing arrived, or the peek found nothing (and
        // tokio clears the readiness); data, the end of the stream or an error are unclean
        matches!(tcp.try_io(tokio::io::Interest::READABLE, peek), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// The relay's buffers, empty (see `buffers`).
    pub fn take_buffers(&mut self) -> (BytesMut, BytesMut) {
        std::mem::take(&mut self.buffers)
    }

    /// Gives the relay's buffers back for the next relay; what is left in them is dropped (the
    /// connection is then closed anyway, being dirty).
    pub fn keep_buffers(&mut self, mut to_server: BytesMut, mut to_client: BytesMut) {
        to_server.clear();
        to_client.clear();
        self.buffers = (to_server, to_client);
    }

    /// Says goodbye politely; errors do not matter, the socket is dropped either way.
    pub async fn terminate(mut self) {
        let _ = crate::timer::timeout(Duration::from_secs(1), self.send(messages::TERMINATE)).await;
    }
}

/// Where a CancelRequest for what a server connection runs goes: the server and its key.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub key: CancelKey,
}

/// Asks `addr` to cancel whatever the backend with `key` is running (a new connection carrying
/// a CancelRequest; the server answers nothing and closes).
pub async fn send_cancel(addr: &ServerAddr, key: &CancelKey, limit: Duration) -> std::io::Result<()> {
    send_cancel_packet(addr, CANCEL_REQUEST, key, limit).await
}

/// Sends a cancel packet with `code` (CancelRequest, or pgrouter's forwarded one) to `addr`.
pub async fn send_cancel_packet(addr: &ServerAddr, code: u32, key: &CancelKey, limit: Duration) -> std::io::Result<()> {
    let work = async {
        let mut stream = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
        let mut buf = BytesMut::with_capacity(16 + key.secret.len());
        buf.extend_from_slice(&u32::try_from(12 + key.secret.len()).unwrap_or(16).to_be_bytes());
        buf.extend_from_slice(&code.to_be_bytes());
        buf.extend_from_slice(&key.pid.to_be_bytes());
        buf.extend_from_slice(&key.secret);
        stream.write_all(&buf).await?;
        let mut sink = [0u8; 16];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    crate::timer::timeout(limit, work).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn connect_error(spec: &ConnectSpec, reason: String) -> Error {
    Error::Connect { server: spec.addr.to_string(), reason }
}

fn protocol_error(spec: &ConnectSpec, what: &str) -> Error {
    Error::ServerProtocol { server: spec.addr.to_string(), what: what.to_owned() }
}

fn io_to(spec: &ConnectSpec) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| connect_error(spec, e.to_string())
}
