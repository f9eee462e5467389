//! The server side: connections to PostgreSQL, the pools that lend them, the health checker,
//! and the choice of a replica for a read.
//!
//! A database's servers are organised as its config says: shards, each a primary and its
//! replicas, and one [`Pool`] per (database, user, server). Sessions ask for a server by
//! [`Target`] and shard; they never open server connections themselves.

pub mod conn;
pub mod health;
pub mod pool;
pub mod statements;
pub mod tick;
pub mod tls;
pub mod waiting;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use conn::{ConnectSpec, ServerConn};
pub use pool::{Checkout, Pool, PoolKey, PoolMetrics, PoolSettings};
pub use waiting::Waiting;

use crate::config::{Config, DatabaseConfig, LoadBalance, ServerAddr, UserConfig};
use crate::router::{Role, Route, ShardId, Target};
use crate::telemetry::Telemetry;
use health::{Lsn, ServerHealth, ShardHealth};
use tls::ServerTlsSettings;

/// The pools of one shard.
pub struct ShardPools {
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Pool>>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// What a read needs from a replica.
#[derive(Debug, Clone, Copy)]
pub struct ReadNeeds {
    pub max_lag: Duration,
    /// Read-your-writes: the replica must have replayed this far.
    pub min_lsn: Option<Lsn>,
}

impl ShardPools {
    /// Picks a server for `target`. `None` when a replica is required and none qualifies.
    #[must_use]
    pub fn pick(&self, target: Target, needs: ReadNeeds, balance: LoadBalance) -> Option<&Arc<Pool>> {
        if target == Target::Primary {
            return Some(&self.primary);
        }
        let usable = |p: &&Arc<Pool>| {
            p.health.usable_replica(needs.max_lag) && needs.min_lsn.is_none_or(|lsn| p.health.lsn() >= lsn)
        };
        // walked twice (count, then choose) rather than collected: a read allocates nothing
        let primary = (target == Target::Any).then_some(&self.primary);
        let candidates = || self.replicas.iter().filter(usable).chain(primary);
        let n = candidates().count();
        if n == 0 {
            return None;
        }
        match balance {
            LoadBalance::LeastBusy => {
                // ties go round-robin, so an idle system still spreads its reads
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                candidates().cycle().skip(start).take(n).min_by_key(|p| p.busy())
            }
            // a replica may turn unusable between the two walks: then take any that still is
            LoadBalance::RoundRobin => {
                candidates().nth(self.next.fetch_add(1, Ordering::Relaxed) % n).or_else(|| candidates().next())
            }
            LoadBalance::Random => candidates().nth(rand::random_range(0..n)).or_else(|| candidates().next()),
        }
    }

    /// Why no replica qualifies, for the error a client sees.
    #[must_use]
    pub fn replica_report(&self) -> String {
        if self.replicas.is_empty() {
            return "no replicas configured".into();
        }
        self.replicas.iter().map(|p| p.health.describe()).collect::<Vec<_>>().join("; ")
    }
}

/// Every pool one (database, user) pair can use.
pub struct ClusterPools {
    pub shards: Vec<ShardPools>,
}

impl ClusterPools {
    /// The pool a route names; for replicas, the first one (tests and diagnostics).
    #[must_use]
    pub fn pool(&self, route: Route) -> Option<&Arc<Pool>> {
        let shard = self.shards.get(route.shard.0)?;
        match route.role {
            Role::Primary => Some(&shard.primary),
            Role::Replica => shard.replicas.first(),
        }
    }

    #[must_use]
    pub fn shard(&self, shard: ShardId) -> Option<&ShardPools> {
        self.shards.get(shard.0)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.shards.iter().flat_map(|s| std::iter::once(&s.primary).chain(&s.replicas))
    }
}

/// All pools, keyed by (database, user), and the health of every server.
#[derive(Default)]
pub struct Pools {
    by_login: HashMap<(String, String), Arc<ClusterPools>>,
    pub health: Vec<Arc<ShardHealth>>,
}

impl Pools {
    #[must_use]
    /// Builds the pools of `config`. After a reload, `previous` are the pools in use: a pool
    /// whose key and connection settings did not change is kept (resized to the new
    /// settings), with its connections, and so is each server's health record.
    /// `server_tls` holds the TLS settings of the databases that use TLS to their servers.
    pub fn build(
        config: &Config,
        telemetry: &Telemetry,
        previous: Option<&Pools>,
        server_tls: &HashMap<String, Arc<ServerTlsSettings>>,
    ) -> Self {
        let metrics = PoolMetrics {
            wait: telemetry.histogram("pgrouter_pool_wait_seconds", &[]),
            wait_timeouts: telemetry.counter("pgrouter_pool_wait_timeouts_total", &[]),
        };
        let mut by_login = HashMap::new();
        let mut all_health = Vec::new();
        for db in &config.databases {
            let health: Vec<Arc<ShardHealth>> = db
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| shard_health(config, db, ShardId(i), &s.primary, &s.replicas, previous, server_tls))
                .collect();
            for user in &config.users {
                let shards = db
                    .shards
                    .iter()
                    .zip(&health)
                    .enumerate()
                    .map(|(i, (shard, h))| {
                        let pool = |role, addr: &ServerAddr, health: &Arc<ServerHealth>| {
                            let key = pool_key(db, user, Route { shard: ShardId(i), role }, addr);
                            let spec = connect_spec(config, db, user, addr, server_tls);
                            let settings = pool_settings(config, db);
                            match previous.and_then(|p| p.all().find(|old| old.key == key && old.spec == spec)) {
                                Some(kept) => {
                                    kept.resize(settings);
                                    Arc::clone(kept)
                                }
                                None => Pool::new(key, spec, settings, Arc::clone(health), metrics.clone()),
                            }
                        };
                        ShardPools {
                            primary: pool(Role::Primary, &shard.primary, &h.primary),
                            replicas: shard
                                .replicas
                                .iter()
                                .zip(&h.replicas)
                                .map(|(r, rh)| pool(Role::Replica, r, rh))
                                .collect(),
                            next: AtomicUsize::new(0),
                        }
                    })
                    .collect();
                by_login.insert((db.name.clone(), user.name.clone()), Arc::new(ClusterPools { shards }));
            }
            all_health.extend(health);
        }
        Self { by_login, health: all_health }
    }

    #[must_use]
    pub fn get(&self, database: &str, user: &str) -> Option<&Arc<ClusterPools>> {
        self.by_login.get(&(database.to_owned(), user.to_owned()))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.by_login.values().flat_map(|c| c.all())
    }

    /// Retires the pools `next` (the pools after a reload) no longer has.
    pub fn retire_unused(&self, next: &Pools) {
        for pool in self.all().filter(|old| !next.all().any(|new| Arc::ptr_eq(old, new))) {
            tracing::info!(pool = %pool.key, "pool removed by reload; its connections close as they come back");
            pool.retire();
        }
    }
}

/// The health records of one shard, checked with the first configured user's credentials.
fn shard_health(
    config: &Config,
    db: &DatabaseConfig,
    shard: ShardId,
    primary: &ServerAddr,
    replicas: &[ServerAddr],
    previous: Option<&Pools>,
    server_tls: &HashMap<String, Arc<ServerTlsSettings>>,
) -> Arc<ShardHealth> {
    let checker = config.users.first().expect("validated: at least one user");
    // a server kept by a reload keeps what its checks found (bans, lag)
    let server = |role: Role, addr: &ServerAddr| {
        previous
            .into_iter()
            .flat_map(|p| &p.health)
            .flat_map(|s| std::iter::once(&s.primary).chain(&s.replicas))
            .find(|h| h.database == db.name && h.shard == shard && h.role == role && h.addr == *addr)
            .cloned()
            .unwrap_or_else(|| ServerHealth::new(&db.name, shard, role, addr.clone()))
    };
    Arc::new(ShardHealth {
        primary: server(Role::Primary, primary),
        replicas: replicas.iter().map(|r| server(Role::Replica, r)).collect(),
        spec: ConnectSpec {
            application_name: Some("pgrouter health check"),
            ..connect_spec(config, db, checker, primary, server_tls)
        },
    })
}

fn connect_spec(
    config: &Config,
    db: &DatabaseConfig,
    user: &UserConfig,
    addr: &ServerAddr,
    server_tls: &HashMap<String, Arc<ServerTlsSettings>>,
) -> ConnectSpec {
    ConnectSpec {
        addr: addr.clone(),
        user: user.server_user.clone(),
        password: user.server_password.clone(),
        database: db.server_database.clone(),
        connect_timeout: config.proxy.server_connect_timeout,
        application_name: None,
        tls: server_tls.get(&db.name).cloned(),
    }
}

fn pool_key(db: &DatabaseConfig, user: &UserConfig, route: Route, addr: &ServerAddr) -> PoolKey {
    PoolKey {
        database: db.name.clone(),
        user: user.name.clone(),
        shard: route.shard,
        role: route.role,
        server: addr.clone(),
    }
}

fn pool_settings(config: &Config, db: &DatabaseConfig) -> PoolSettings {
    let proxy = &config.proxy;
    PoolSettings {
        size: db.pool_size,
        min_size: db.min_pool_size,
        wait_timeout: proxy.query_wait_timeout,
        idle_timeout: proxy.server_idle_timeout,
        lifetime: proxy.server_lifetime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(port: u16, role: Role) -> Arc<Pool> {
        let addr = ServerAddr { host: "127.0.0.1".into(), port };
        let key = PoolKey { database: "d".into(), user: "u".into(), shard: ShardId(0), role, server: addr.clone() };
        let spec = ConnectSpec {
            addr: addr.clone(),
            user: "u".into(),
            password: None,
            database: "d".into(),
            connect_timeout: Duration::from_secs(1),
            application_name: Some("test"),
            tls: None,
        };
        let settings = PoolSettings {
            size: 1,
            min_size: 0,
            wait_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            lifetime: Duration::from_secs(1),
        };
        Pool::new(key, spec, settings, ServerHealth::new("d", ShardId(0), role, addr), PoolMetrics::default())
    }

    fn shard() -> ShardPools {
        ShardPools {
            primary: pool(1, Role::Primary),
            replicas: vec![pool(2, Role::Replica), pool(3, Role::Replica)],
            next: AtomicUsize::new(0),
        }
    }

    const NEEDS: ReadNeeds = ReadNeeds { max_lag: Duration::from_secs(1), min_lsn: None };

    fn port(p: Option<&Arc<Pool>>) -> Option<u16> {
        p.map(|p| p.key.server.port)
    }

    #[test]
    fn only_healthy_caught_up_replicas_serve_reads() {
        let s = shard();
        assert_eq!(
            port(s.pick(Target::Replica, NEEDS, LoadBalance::RoundRobin)),
            None,
            "unchecked replicas are not used"
        );
        s.replicas[0].health.set_observed(100, Duration::ZERO);
        s.replicas[1].health.set_observed(50, Duration::from_secs(3));
        for _ in 0..4 {
            assert_eq!(
                port(s.pick(Target::Replica, NEEDS, LoadBalance::RoundRobin)),
                Some(2),
                "the lagging one is skipped"
            );
        }
        let needs = ReadNeeds { min_lsn: Some(101), ..NEEDS };
        assert_eq!(port(s.pick(Target::Replica, needs, LoadBalance::RoundRobin)), None, "none has replayed LSN 101");
        assert_eq!(port(s.pick(Target::Primary, needs, LoadBalance::RoundRobin)), Some(1));
        assert_eq!(port(s.pick(Target::Any, needs, LoadBalance::RoundRobin)), Some(1));
    }

    #[test]
    fn balancing_policies() {
        let s = shard();
        s.replicas[0].health.set_observed(1, Duration::ZERO);
        s.replicas[1].health.set_observed(1, Duration::ZERO);
        let picks: Vec<_> =
            (0..4).map(|_| port(s.pick(Target::Replica, NEEDS, LoadBalance::RoundRobin)).unwrap()).collect();
        assert_eq!(picks, [2, 3, 2, 3]);
        s.replicas[0].stats.in_use.store(5, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(port(s.pick(Target::Replica, NEEDS, LoadBalance::LeastBusy)), Some(3));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(port(s.pick(Target::Replica, NEEDS, LoadBalance::Random)).unwrap());
        }
        assert_eq!(seen.len(), 2, "random uses both");
        let mut any = std::collections::HashSet::new();
        for _ in 0..6 {
            any.insert(port(s.pick(Target::Any, NEEDS, LoadBalance::RoundRobin)).unwrap());
        }
        assert_eq!(any.len(), 3, "reads = any includes the primary");
    }
}
