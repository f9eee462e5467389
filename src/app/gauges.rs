//! What `/metrics` and `/readyz` report about the app's state. Gauges are set from the
//! state itself at each scrape (clients, pools, server health, cache counters), so they
//! always agree with what SHOW commands and routing see.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::App;
use crate::backend::health::{BanReason, ServerHealth};
use crate::frontend::clients::ClientState;
use crate::router::Role;

impl App {
    /// The Prometheus exposition, with every gauge brought up to date first.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        self.refresh_gauges();
        self.telemetry.render()
    }

    /// Ready: the config is loaded and the listener bound (the app exists), the proxy is not
    /// draining, and at least one primary passed its last health check.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        if self.now().pools.health.iter().any(|shard| shard.primary.up()) {
            Ok(())
        } else {
            Err("no primary has passed a health check".into())
        }
    }

    fn refresh_gauges(&self) {
        let t = &self.telemetry;
        let now = self.now();
        // clients: every configured (database, user) appears, idle or not
        const STATES: [ClientState; 3] = [ClientState::Active, ClientState::Idle, ClientState::Waiting];
        let mut clients: BTreeMap<(&str, &str), [u64; 3]> = BTreeMap::new();
        let mut pinned: BTreeMap<&str, u64> = BTreeMap::new();
        for db in &now.config.databases {
            pinned.insert(&db.name, 0);
            for user in &now.config.users {
                clients.insert((&db.name, &user.name), [0; 3]);
            }
        }
        let sessions = self.sessions.snapshot();
        for client in &sessions {
            let i = STATES.iter().position(|s| *s == client.state()).unwrap_or(1);
            if let Some(counts) = clients.get_mut(&(client.database.as_str(), client.user.as_str())) {
                counts[i] += 1;
            }
            if client.pinned()
                && let Some(n) = pinned.get_mut(client.database.as_str())
            {
                *n += 1;
            }
        }
        for ((database, user), counts) in clients {
            for (state, n) in STATES.iter().zip(counts) {
                let labels = [("database", database), ("user", user), ("state", state.as_str())];
                t.gauge("pgrouter_clients", &labels).set(n as f64);
            }
        }
        for (database, n) in pinned {
            t.gauge("pgrouter_pinned_clients", &[("database", database)]).set(n as f64);
        }
        for pool in now.pools.all() {
            let key = &pool.key;
            let (shard, server) = (key.shard.to_string(), key.server.to_string());
            let labels = [
                ("database", key.database.as_str()),
                ("user", key.user.as_str()),
                ("shard", shard.as_str()),
                ("role", key.role.as_str()),
                ("server", server.as_str()),
            ];
            t.gauge("pgrouter_pool_size", &labels).set(pool.settings().size as f64);
            let states = [
                ("active", pool.stats.in_use.load(Ordering::Relaxed)),
                ("idle", pool.idle_count()),
                ("connecting", pool.stats.connecting.load(Ordering::Relaxed)),
            ];
            for (state, n) in states {
                let mut with_state = labels.to_vec();
                with_state.push(("state", state));
                t.gauge("pgrouter_pool_servers", &with_state).set(n as f64);
            }
        }
        for shard in &now.pools.health {
            for server in std::iter::once(&shard.primary).chain(&shard.replicas) {
                self.server_gauges(server);
            }
        }
        t.counter("pgrouter_parse_cache_hits_total", &[]).absolute(self.router.hits.load(Ordering::Relaxed));
        t.counter("pgrouter_parse_cache_misses_total", &[]).absolute(self.router.misses.load(Ordering::Relaxed));
    }

    fn server_gauges(&self, server: &ServerHealth) {
        let t = &self.telemetry;
        let (shard, addr) = (server.shard.to_string(), server.addr.to_string());
        let (database, shard, addr) = (server.database.as_str(), shard.as_str(), addr.as_str());
        let up = [("database", database), ("shard", shard), ("role", server.role.as_str()), ("server", addr)];
        t.gauge("pgrouter_server_up", &up).set(if server.up() { 1.0 } else { 0.0 });
        let labels = [("database", database), ("shard", shard), ("server", addr)];
        if server.role == Role::Replica {
            let lag = server.lag();
            // unknown lag (behind, nothing replayed yet) shows as +Inf
            let seconds = if lag.as_secs() > 1_000_000_000 { f64::INFINITY } else { lag.as_secs_f64() };
            t.gauge("pgrouter_replica_lag_seconds", &labels).set(seconds);
        }
        for reason in BanReason::ALL {
            let mut with_reason = labels.to_vec();
            with_reason.push(("reason", reason.as_str()));
            t.counter("pgrouter_bans_total", &with_reason).absolute(server.bans(reason));
        }
    }
}
