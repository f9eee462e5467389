//! From a new TCP connection to a logged-in session: the startup packet (answering SSLRequest
//! and GSSENCRequest with 'N' while TLS is off, forwarding CancelRequests), authentication,
//! the database check, and the greeting (AuthenticationOk, the backend's ParameterStatus
//! values, pgrouter's own BackendKeyData, ReadyForQuery).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::auth::authenticate;
use super::client::{ClientIo, ClientStream};
use super::session::{Session, SessionParams};
use super::settings;
use crate::app::App;
use crate::backend::Pool;
use crate::backend::conn::Settings;
use crate::backend::pool::ServerParams;
use crate::config::{ADMIN_DATABASE, TlsMode};
use crate::error::Error;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::protocol::startup::{StartupMessage, StartupPacket};
use crate::router::Route;

/// How long applying a client's startup settings may take.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a forwarded cancel may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// SSLRequest and GSSENCRequest may each come once before the startup message.
const MAX_NEGOTIATIONS: usize = 2;
/// Largest message accepted before login completes (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH),
/// so unauthenticated clients cannot make the proxy buffer max_message_size each.
const LOGIN_MESSAGE_MAX: usize = 65_535;

/// Serves one client connection from its first byte to its last.
/// `tls`: the stream is TLS (see `frontend::tls`), with its channel binding data.
pub async fn serve_client<S: ClientIo>(app: Arc<App>, io: S, peer: SocketAddr, tls: Option<Arc<[u8]>>) {
    let mut client = ClientStream::new(io, LOGIN_MESSAGE_MAX.min(app.now().config.proxy.max_message_size));
    let login_timeout = app.now().config.proxy.client_login_timeout;
    let params = match crate::timer::timeout(login_timeout, Box::pin(login(&app, &mut client, tls))).await {
        Ok(Ok(Some(LoggedIn::Session(params)))) => params,
        Ok(Ok(Some(LoggedIn::Admin(user)))) => {
            client.max_message = app.now().config.proxy.max_message_size;
            Box::pin(super::admin::serve(app, client, user)).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(client = %peer, error = %e, kind = e.kind(), "login refused");
            client.send_error(Severity::Fatal, &e).await;
            return;
        }
        Err(_) => {
            let e = Error::Protocol(format!(
                "no login within client_login_timeout ({})",
                humantime::format_duration(login_timeout)
            ));
            tracing::info!(client = %peer, "login timed out");
            client.send_error(Severity::Fatal, &e).await;
            return;
        }
    };
    client.max_message = app.now().config.proxy.max_message_size;
    let (user, database) = (params.user.clone(), params.database.clone());
    tracing::info!(client = %peer, %user, %database, "client connected");
    let me = app.sessions.register(&database, &user, peer);
    Session::new(app, client, params, me).run().await;
    tracing::info!(client = %peer, %user, %database, "client disconnected");
}

/// Who logged in.
enum LoggedIn {
    Session(SessionParams),
    /// An admin user, to database `pgrouter`: the admin console.
    Admin(String),
}

/// Runs the startup phase; `None` when the connection carried a CancelRequest or closed.
async fn login<S: ClientIo>(
    app: &Arc<App>,
    client: &mut ClientStream<S>,
    tls: Option<Arc<[u8]>>,
) -> Result<Option<LoggedIn>, Error> {
    let Some(startup) = read_startup(app, client).await? else {
        return Ok(None);
    };
    if tls.is_none() && app.now().config.proxy.tls.mode == TlsMode::Require {
        return Err(Error::Unauthorized(
            "pgrouter accepts only TLS connections (proxy.tls.mode = \"require\"): connect with sslmode=require".into(),
        ));
    }
    if startup.minor_version > 0 || !startup.protocol_options.is_empty() {
        client.send(&messages::negotiate_protocol_version(0, &startup.protocol_options)).await?;
    }
    let user_name = startup
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::Unauthorized("no user name in the startup packet".into()))?;
    if startup.param("replication").is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0")) {
        return Err(Error::NotSupported(
            "replication connections are not supported by pgrouter; connect to the server directly".into(),
        ));
    }
    let database = startup.param("database").filter(|d| !d.is_empty()).unwrap_or(user_name);
    let snapshot = app.now();
    let config = Arc::clone(&snapshot.config);
    let user = config
        .user(user_name)
        .ok_or_else(|| Error::Unauthorized(format!("user \"{user_name}\" is not configured in pgrouter")))?;
    authenticate(client, user, &snapshot.verifiers, tls.as_deref()).await?;
    if database == ADMIN_DATABASE {
        if !config.proxy.admin_users.iter().any(|a| a == &user.name) {
            return Err(Error::Unauthorized(format!(
                "user \"{}\" may not use the admin console (it is not in proxy.admin_users)",
                user.name
            )));
        }
        greet_admin(client, &app.cancels.register().key()).await?;
        return Ok(Some(LoggedIn::Admin(user.name.clone())));
    }
    let db = config.database(database).ok_or_else(|| Error::UnknownDatabase(database.to_owned()))?;
    let pools = snapshot
        .pools
        .get(&db.name, &user.name)
        .cloned()
        .ok_or_else(|| Error::Internal(format!("no pools for {}/{}", db.name, user.name)))?;
    let policy = snapshot
        .policies
        .get(&db.name)
        .cloned()
        .ok_or_else(|| Error::Internal(format!("no routing policy for {}", db.name)))?;
    let pool = pools
        .pool(Route::primary(policy.home()))
        .ok_or_else(|| Error::Internal("home shard has no primary pool".into()))?;
    let mut settings = settings::from_startup(&startup.params)?;
    let server_params = greeting_params(pool, &mut settings).await?;
    let cancel = app.cancels.register();

    let mut greeting = BytesMut::new();
    greeting.extend_from_slice(&messages::auth::ok());
    for (name, value) in server_params.iter() {
        greeting.extend_from_slice(&messages::parameter_status(name, value));
    }
    greeting.extend_from_slice(&messages::backend_key_data(&cancel.key()));
    greeting.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
    client.send(&greeting).await?;
    Ok(Some(LoggedIn::Session(SessionParams {
        user: user.name.clone(),
        database: db.name.clone(),
        mode: db.pool_mode,
        settings,
        pools,
        policy,
        cancel,
        generation: snapshot.generation,
    })))
}

/// The admin console's greeting: what psql needs to start.
async fn greet_admin<S: ClientIo>(
    client: &mut ClientStream<S>,
    key: &crate::protocol::startup::CancelKey,
) -> Result<(), Error> {
    let mut greeting = BytesMut::new();
    greeting.extend_from_slice(&messages::auth::ok());
    let version = format!("15.0 (pgrouter {})", env!("CARGO_PKG_VERSION"));
    let params = [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "off"),
    ];
    for (name, value) in params {
        greeting.extend_from_slice(&messages::parameter_status(name, value));
    }
    greeting.extend_from_slice(&messages::backend_key_data(key));
    greeting.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
    client.send(&greeting).await
}

/// The ParameterStatus values a new client sees, and its startup settings reduced to those
/// that differ from the server's defaults. A setting whose effect the proxy cannot know
/// without the server (anything but `application_name` that is not already the default) is
/// applied on a server connection right away, so an invalid one fails the login as it would
/// on PostgreSQL, and the values reported are the server's own (`DateStyle=ISO` is reported
/// as `ISO, MDY`). Most clients (only `client_encoding=UTF8`, say) need no server at login.
async fn greeting_params(pool: &Arc<Pool>, settings: &mut Settings) -> Result<ServerParams, Error> {
    let defaults = pool.server_params().await?;
    let default_of = |name: &str| defaults.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    settings.retain(|name, value| default_of(name) != Some(value.as_str()));
    if settings.keys().all(|name| name == "application_name") {
        let mut params: Vec<(String, String)> = defaults.iter().cloned().collect();
        if let Some(app) = settings.get("application_name") {
            match params.iter_mut().find(|(k, _)| k == "application_name") {
                Some(slot) => slot.1.clone_from(app),
                None => params.push(("application_name".into(), app.clone())),
            }
        }
        return Ok(Arc::new(params));
    }
    let mut checkout = pool.checkout().await?;
    let conn = checkout.conn();
    if let Some(sql) = settings::apply_sql(settings, &conn.settings) {
        match conn.run_simple(&sql, SETTINGS_TIMEOUT).await {
            Ok(TxStatus::Idle) => conn.settings = Arc::new(settings.clone()),
            Ok(_) => {
                return Err(Error::Internal("applying startup parameters left a transaction open".into()));
            }
            Err(reason) => {
                checkout.release();
                return Err(Error::Invalid(format!("invalid startup parameter: {reason}")));
            }
        }
    }
    let params = Arc::new(conn.params.clone());
    checkout.release();
    Ok(params)
}

/// Reads packets until the StartupMessage, answering encryption requests and forwarding a
/// CancelRequest (after which the connection ends, as with PostgreSQL).
async fn read_startup<S: ClientIo>(
    app: &Arc<App>,
    client: &mut ClientStream<S>,
) -> Result<Option<StartupMessage>, Error> {
    for _ in 0..=MAX_NEGOTIATIONS {
        match client.read_startup().await? {
            None => return Ok(None),
            // TLS and GSS encryption are not offered: 'N' lets the client continue in plaintext.
            Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => client.send(b"N").await?,
            Some(StartupPacket::Cancel(key)) => {
                if app.cancels.is_local(&key) {
                    app.cancels.cancel(&key, CANCEL_TIMEOUT).await;
                } else {
                    let peers = app.now().config.proxy.peers.clone();
                    app.cancels.forward_to_peers(&key, &peers, CANCEL_TIMEOUT).await;
                }
                return Ok(None);
            }
            Some(StartupPacket::PeerCancel(key)) => {
                if app.cancels.is_local(&key) {
                    app.cancels.cancel(&key, CANCEL_TIMEOUT).await;
                }
                return Ok(None);
            }
            Some(StartupPacket::Startup(m)) => return Ok(Some(m)),
        }
    }
    Err(Error::Protocol("too many encryption requests before the startup message".into()))
}
