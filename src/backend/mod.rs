//! The server side: connections to PostgreSQL and the pools that lend them to sessions.
//!
//! A database's servers are organised as its config says: shards, each a primary and its
//! replicas, and one [`Pool`] per (database, user, server). Sessions ask for a pool by
//! [`Route`]; they never open server connections themselves.

pub mod conn;
pub mod pool;

use std::collections::HashMap;
use std::sync::Arc;

pub use conn::{ConnectSpec, ServerConn};
pub use pool::{Checkout, Pool, PoolKey, PoolSettings};

use crate::config::{Config, DatabaseConfig, ServerAddr, UserConfig};
use crate::router::{Role, Route, ShardId};

/// The pools of one shard.
pub struct ShardPools {
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Pool>>,
}

/// Every pool one (database, user) pair can use.
pub struct ClusterPools {
    pub shards: Vec<ShardPools>,
}

impl ClusterPools {
    /// The pool a route names; `None` if the config has no such server.
    #[must_use]
    pub fn pool(&self, route: Route) -> Option<&Arc<Pool>> {
        let shard = self.shards.get(route.shard.0)?;
        match route.role {
            Role::Primary => Some(&shard.primary),
            Role::Replica => shard.replicas.first(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.shards
            .iter()
            .flat_map(|s| std::iter::once(&s.primary).chain(&s.replicas))
    }
}

/// All pools, keyed by (database, user).
#[derive(Default)]
pub struct Pools {
    by_login: HashMap<(String, String), Arc<ClusterPools>>,
}

impl Pools {
    #[must_use]
    pub fn build(config: &Config) -> Self {
        let mut by_login = HashMap::new();
        for db in &config.databases {
            for user in &config.users {
                let shards = db
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(i, shard)| {
                        let pool = |role, addr: &ServerAddr| {
                            new_pool(
                                config,
                                db,
                                user,
                                Route {
                                    shard: ShardId(i),
                                    role,
                                },
                                addr,
                            )
                        };
                        ShardPools {
                            primary: pool(Role::Primary, &shard.primary),
                            replicas: shard
                                .replicas
                                .iter()
                                .map(|r| pool(Role::Replica, r))
                                .collect(),
                        }
                    })
                    .collect();
                by_login.insert(
                    (db.name.clone(), user.name.clone()),
                    Arc::new(ClusterPools { shards }),
                );
            }
        }
        Self { by_login }
    }

    #[must_use]
    pub fn get(&self, database: &str, user: &str) -> Option<&Arc<ClusterPools>> {
        self.by_login.get(&(database.to_owned(), user.to_owned()))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.by_login.values().flat_map(|c| c.all())
    }
}

fn new_pool(
    config: &Config,
    db: &DatabaseConfig,
    user: &UserConfig,
    route: Route,
    addr: &ServerAddr,
) -> Arc<Pool> {
    let proxy = &config.proxy;
    let key = PoolKey {
        database: db.name.clone(),
        user: user.name.clone(),
        shard: route.shard,
        role: route.role,
        server: addr.clone(),
    };
    let spec = ConnectSpec {
        addr: addr.clone(),
        user: user.server_user.clone(),
        password: user.server_password.clone(),
        database: db.server_database.clone(),
        connect_timeout: proxy.server_connect_timeout,
    };
    let settings = PoolSettings {
        size: db.pool_size,
        min_size: db.min_pool_size,
        wait_timeout: proxy.query_wait_timeout,
        idle_timeout: proxy.server_idle_timeout,
        lifetime: proxy.server_lifetime,
    };
    Pool::new(key, spec, settings)
}
