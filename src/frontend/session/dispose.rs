//! What happens to a session's server connection when things end: the server lost
//! mid-request (`survive_lost_server`), or the client gone (`dispose_server`, which returns
//! the connection to the pool only if it can be made clean).

use std::sync::Arc;

use super::{DRAIN_TIMEOUT, Departure, RESET_TIMEOUT, Session};
use crate::backend::conn::send_cancel;
use crate::backend::health::BanReason;
use crate::config::PoolMode;
use crate::error::Error;
use crate::frontend::client::ClientIo;
use crate::frontend::relay;
use crate::frontend::settings;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::Role;

impl<S: ClientIo> Session<S> {
    /// The server went away mid-request. A replica is banned. Outside a transaction nothing
    /// the client relies on was lost: it gets an error for the request and keeps its session.
    pub(super) async fn survive_lost_server(&mut self, error: &Error) -> Result<bool, Error> {
        self.params.cancel.set_target(None);
        let Some(attached) = self.server.take() else {
            return Ok(false);
        };
        if attached.role() == Role::Replica {
            attached.checkout.pool().health.ban(
                self.app.now().config.proxy.ban_time,
                BanReason::ServerLost,
                &error.to_string(),
            );
        }
        if !attached.started_idle || self.flow.status() != TxStatus::Idle || self.params.mode == PoolMode::Session {
            return Ok(false);
        }
        drop(attached); // closes the dead connection
        tracing::info!(error = %error, "server lost outside a transaction; the client keeps its session");
        self.client.send_error(Severity::Error, error).await;
        for _ in 0..self.flow.pending() {
            self.client.send(&messages::ready_for_query(TxStatus::Idle)).await?;
        }
        self.skip_until_sync = self.flow.unsynced();
        Ok(true)
    }

    /// Returns the session's server connection to the pool only if it can be made clean.
    pub(super) async fn dispose_server(&mut self, usable: bool) {
        self.params.cancel.set_target(None);
        let Some(mut attached) = self.server.take() else {
            return;
        };
        let left = self.left.unwrap_or(Departure { terminated: false, server_dirty: false });
        if !usable || left.server_dirty || self.flow.tainted() {
            return; // dropping the checkout closes the connection
        }
        let conn = attached.checkout.conn();
        if left.terminated && !self.flow.at_rest() && !relay::drain(conn, &mut self.flow, DRAIN_TIMEOUT).await {
            return;
        }
        if !self.flow.at_rest() {
            // A statement is still running for a client that vanished: stop it, then close.
            if let Err(e) = send_cancel(&conn.addr, &conn.cancel.key, RESET_TIMEOUT).await {
                tracing::debug!(server = %conn.addr, error = %e, "cancel of an orphaned statement failed");
            }
            return;
        }
        if self.flow.status() != TxStatus::Idle
            && conn.run_simple("ROLLBACK", RESET_TIMEOUT).await != Ok(TxStatus::Idle)
        {
            return;
        }
        if self.params.mode == PoolMode::Session || self.pinned.is_some() {
            // a dedicated connection: DISCARD ALL drops settings, prepared statements, LISTEN,
            // temporary tables, advisory locks and cursors in one go
            if conn.run_simple("DISCARD ALL", RESET_TIMEOUT).await != Ok(TxStatus::Idle) {
                return;
            }
            conn.settings = Arc::default();
            conn.statements.clear();
        } else if attached.effects.session_state {
            // the client changed settings and left before they were read back
            let sql =
                settings::capture_sql(self.custom_settings.iter().chain(conn.settings.keys()).map(String::as_str));
            match conn.query_rows(&sql, RESET_TIMEOUT).await {
                Ok(rows) => conn.settings = Arc::new(settings::from_rows(rows)),
                Err(_) => return,
            }
        }
        attached.checkout.release();
    }
}
