//! The admin console (DESIGN §9): database `pgrouter`, for the users in `admin_users`.
//! It speaks the simple query protocol; each command is answered with an ordinary result
//! set (`show.rs`), so psql and PgBouncer's exporters can read it.
//!
//! Commands: SHOW POOLS | STATS | CLIENTS | SERVERS | DATABASES | CONFIG | ROUTES | VERSION | HELP,
//! RELOAD, PAUSE [db], RESUME [db], SHUTDOWN.

mod show;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::client::{ClientIo, ClientStream};
use crate::app::App;
use crate::error::{Error, SqlState};
use crate::protocol::messages::{self, Severity, TxStatus};

/// How often PAUSE looks whether the paused databases' server connections are all back.
const PAUSE_POLL: Duration = Duration::from_millis(50);

/// Serves an admin console session until the client leaves.
pub async fn serve<S: ClientIo>(app: Arc<App>, mut client: ClientStream<S>, user: String) {
    tracing::info!(%user, "admin console session opened");
    let mut skip_until_sync = false;
    loop {
        let read = tokio::select! {
            biased;
            () = app.shutdown.cancelled() => {
                let bye = messages::error_response(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "terminating connection: pgrouter is shutting down");
                let _ = client.send(&bye).await;
                break;
            }
            read = client.read_frame() => read,
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        let answer = match frame.tag() {
            b'X' => break,
            b'S' => {
                skip_until_sync = false;
                messages::ready_for_query(TxStatus::Idle)
            }
            _ if skip_until_sync => continue,
            b'Q' => {
                let sql = messages::query_text(frame.body()).unwrap_or_default();
                let sql = String::from_utf8_lossy(sql).into_owned();
                let mut out = match run(&app, &user, &sql).await {
                    Ok(result) => BytesMut::from(&result[..]),
                    Err(e) => {
                        BytesMut::from(&messages::error_response(Severity::Error, e.sqlstate(), &e.to_string())[..])
                    }
                };
                out.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
                out.freeze()
            }
            b'F' => {
                let mut out = BytesMut::from(
                    &messages::error_response(
                        Severity::Error,
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "the admin console takes simple queries only",
                    )[..],
                );
                out.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
                out.freeze()
            }
            _ => {
                skip_until_sync = true;
                messages::error_response(
                    Severity::Error,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the admin console takes simple queries only (SHOW POOLS, SHOW STATS, ...)",
                )
            }
        };
        if client.send(&answer).await.is_err() {
            break;
        }
    }
    tracing::info!(%user, "admin console session closed");
}

/// Runs one admin command; the result sets (or CommandComplete) to answer with.
async fn run(app: &Arc<App>, user: &str, sql: &str) -> Result<Bytes, Error> {
    let text = sql.trim().trim_end_matches(';').trim().to_lowercase();
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["show", "pools"] => Ok(show::pools(app)),
        ["show", "stats"] => Ok(show::stats(app)),
        ["show", "clients"] => Ok(show::clients(app)),
        ["show", "servers"] => Ok(show::servers(app)),
        ["show", "databases"] => Ok(show::databases(app)),
        ["show", "config"] => Ok(show::config(app)),
        ["show", "version"] => Ok(show::version()),
        ["show", "routes"] => Ok(show::routes(app)),
        ["show", "help"] | ["help"] => Ok(show::help()),
        ["pause", rest @ ..] => {
            let databases = chosen(app, rest)?;
            tracing::info!(%user, databases = ?databases, "PAUSE");
            app.pause(&databases, true);
            // answered once every server connection of those databases is back in its pool
            while app.now().pools.all().any(|p| {
                databases.contains(&p.key.database) && p.stats.in_use.load(std::sync::atomic::Ordering::Relaxed) > 0
            }) {
                if app.shutdown.is_cancelled() {
                    return Err(Error::Shutdown);
                }
                crate::timer::sleep(PAUSE_POLL).await;
            }
            Ok(messages::command_complete("PAUSE"))
        }
        ["resume", rest @ ..] => {
            let databases = chosen(app, rest)?;
            tracing::info!(%user, databases = ?databases, "RESUME");
            app.pause(&databases, false);
            Ok(messages::command_complete("RESUME"))
        }
        ["shutdown"] => {
            tracing::info!(%user, "SHUTDOWN from the admin console: draining");
            app.stop_requested.cancel();
            Ok(messages::command_complete("SHUTDOWN"))
        }
        ["reload"] => {
            tracing::info!(%user, "RELOAD from the admin console");
            app.reload().map_err(|e| Error::Invalid(format!("the config was not reloaded:\n{e}")))?;
            Ok(messages::command_complete("RELOAD"))
        }
        _ => Err(Error::Invalid(format!("unknown admin command \"{}\" (try SHOW HELP)", sql.trim()))),
    }
}

/// The databases a PAUSE or RESUME names: one, or all when none is named.
fn chosen(app: &App, rest: &[&str]) -> Result<Vec<String>, Error> {
    match rest {
        [] => Ok(app.now().config.databases.iter().map(|d| d.name.clone()).collect()),
        [name] => {
            let name = name.trim_matches('"');
            app.now()
                .config
                .databases
                .iter()
                .find(|d| d.name.eq_ignore_ascii_case(name))
                .map(|d| vec![d.name.clone()])
                .ok_or_else(|| Error::UnknownDatabase(name.to_owned()))
        }
        _ => Err(Error::Invalid("PAUSE and RESUME take at most one database name".into())),
    }
}
