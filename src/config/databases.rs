//! The `[[databases]]` section: pools, the shards (each a primary and its replicas), routing
//! preferences and rules, and which tables are sharded by which column.

use std::time::Duration;

use super::reader::{Errors, FromToml, Section, toml_enum};
use super::{ConfigError, ServerAddr};

/// The database name reserved for the admin console.
pub const ADMIN_DATABASE: &str = "pgrouter";

toml_enum!(
    /// When a server connection goes back to the pool: after each transaction, or when the
    /// client leaves.
    PoolMode { Transaction => "transaction", Session => "session" }
);
toml_enum!(
    /// TLS towards the backends.
    ServerTls { Disable => "disable", Prefer => "prefer", Require => "require", VerifyFull => "verify-full" }
);
toml_enum!(ReadsTo { Replicas => "replicas", Primary => "primary", Any => "any" });
toml_enum!(LoadBalance { LeastBusy => "least_busy", RoundRobin => "round_robin", Random => "random" });
toml_enum!(ReadYourWrites { Lsn => "lsn", PrimaryAfterWrite => "primary_after_write", Off => "off" });
toml_enum!(ReplicaFallback { Primary => "primary", Error => "error" });
toml_enum!(CrossShard { Allow => "allow", Deny => "deny" });
toml_enum!(KeyType { Bigint => "bigint", Integer => "integer", Text => "text", Uuid => "uuid" });
toml_enum!(
    /// `hash` places keys as PostgreSQL's `PARTITION BY HASH` does.
    Scheme { Hash => "hash", Range => "range", List => "list" }
);

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub name: String,
    pub server_database: String,
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub server_tls: ServerTls,
    /// The CA certificates (PEM) that verify-full checks the servers' certificates against.
    pub server_tls_ca: Option<std::path::PathBuf>,
    pub routing: RoutingConfig,
    pub shards: Vec<ShardConfig>,
    pub sharded_tables: Vec<ShardedTable>,
    pub sharding: ShardingConfig,
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub reads: ReadsTo,
    pub load_balance: LoadBalance,
    pub max_replica_lag: Duration,
    pub read_your_writes: ReadYourWrites,
    pub replica_fallback: ReplicaFallback,
    pub write_functions: Vec<String>,
    pub read_only_functions: Vec<String>,
    pub rules: Vec<RoutingRule>,
}

/// Where a matching routing rule sends a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleRoute {
    Primary,
    Replica,
    Shard(usize),
    AllShards,
}

impl std::fmt::Display for RuleRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Primary => f.write_str("primary"),
            Self::Replica => f.write_str("replica"),
            Self::Shard(n) => write!(f, "shard:{n}"),
            Self::AllShards => f.write_str("all_shards"),
        }
    }
}

impl FromToml for RuleRoute {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        let s = String::from_toml(v)?;
        match s.as_str() {
            "primary" => Ok(Self::Primary),
            "replica" => Ok(Self::Replica),
            "all_shards" => Ok(Self::AllShards),
            other => other
                .strip_prefix("shard:")
                .and_then(|n| n.parse().ok())
                .map(Self::Shard)
                .ok_or_else(|| format!("\"{s}\" is not one of: primary, replica, shard:<n>, all_shards")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoutingRule {
    pub pattern: regex::Regex,
    pub route: RuleRoute,
}

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub primary: ServerAddr,
    pub replicas: Vec<ServerAddr>,
}

/// A shard-key value in a range or list mapping.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyValue {
    Int(i64),
    Text(String),
}

impl FromToml for KeyValue {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(n) => Ok(Self::Int(*n)),
            toml::Value::String(s) => Ok(Self::Text(s.clone())),
            other => Err(format!("must be an integer or a string, found {}", other.type_str())),
        }
    }
}

/// `{ shard = 0, from = 0, to = 1000 }`: keys in `[from, to)` live on `shard`; a missing bound
/// is unbounded.
#[derive(Debug, Clone)]
pub struct RangeMapping {
    pub shard: usize,
    pub from: Option<KeyValue>,
    pub to: Option<KeyValue>,
}

/// `{ shard = 0, values = [...] }`
#[derive(Debug, Clone)]
pub struct ListMapping {
    pub shard: usize,
    pub values: Vec<KeyValue>,
}

#[derive(Debug, Clone)]
pub struct ShardedTable {
    /// Optionally schema-qualified.
    pub table: String,
    pub column: String,
    pub key_type: KeyType,
    pub scheme: Scheme,
    pub ranges: Vec<RangeMapping>,
    pub lists: Vec<ListMapping>,
}

#[derive(Debug, Clone)]
pub struct ShardingConfig {
    pub cross_shard_reads: CrossShard,
    pub cross_shard_writes: CrossShard,
    pub home_shard: usize,
}

pub(super) fn read(sections: Vec<Section<'_>>, errs: &mut Errors) -> Vec<DatabaseConfig> {
    let mut dbs: Vec<DatabaseConfig> = Vec::new();
    for mut s in sections {
        let Some(db) = read_one(&mut s, errs) else {
            s.finish(errs);
            continue;
        };
        if dbs.iter().any(|d| d.name == db.name) {
            errs.push(ConfigError::new(s.key_path("name"), format!("database \"{}\" is listed twice", db.name)));
        }
        s.finish(errs);
        dbs.push(db);
    }
    dbs
}

fn read_one(s: &mut Section<'_>, errs: &mut Errors) -> Option<DatabaseConfig> {
    let name: Option<String> = s.req("name", errs);
    let server_database: Option<String> = s.opt("server_database", errs);
    let pool_mode = s.or("pool_mode", PoolMode::Transaction, errs);
    let pool_size = s.or("pool_size", 20, errs);
    let min_pool_size = s.or("min_pool_size", 0, errs);
    let server_tls = s.or("server_tls", ServerTls::Disable, errs);
    let server_tls_ca = s.opt::<String>("server_tls_ca", errs).map(std::path::PathBuf::from);
    let routing = read_routing(s.table("routing", errs), errs);
    let shards: Vec<ShardConfig> = s.tables("shards", errs).into_iter().filter_map(|t| read_shard(t, errs)).collect();
    let sharded_tables =
        s.tables("sharded_tables", errs).into_iter().filter_map(|t| read_sharded_table(t, errs)).collect();
    let sharding = read_sharding(s.table("sharding", errs), errs);
    let name = name?;
    let db = DatabaseConfig {
        server_database: server_database.unwrap_or_else(|| name.clone()),
        name,
        pool_mode,
        pool_size,
        min_pool_size,
        server_tls,
        server_tls_ca,
        routing,
        shards,
        sharded_tables,
        sharding,
    };
    check(&db, s, errs);
    Some(db)
}

fn read_routing(mut s: Section<'_>, errs: &mut Errors) -> RoutingConfig {
    let mut rules = Vec::new();
    for mut r in s.tables("rules", errs) {
        let pattern: Option<String> = r.req("pattern", errs);
        let route: Option<RuleRoute> = r.req("route", errs);
        let regex = pattern.and_then(|p| match regex::Regex::new(&p) {
            Ok(re) => Some(re),
            Err(e) => {
                errs.push(ConfigError::new(r.key_path("pattern"), format!("not a valid regular expression: {e}")));
                None
            }
        });
        if let (Some(pattern), Some(route)) = (regex, route) {
            rules.push(RoutingRule { pattern, route });
        }
        r.finish(errs);
    }
    let routing = RoutingConfig {
        reads: s.or("reads", ReadsTo::Replicas, errs),
        load_balance: s.or("load_balance", LoadBalance::LeastBusy, errs),
        max_replica_lag: s.or("max_replica_lag", Duration::from_secs(5), errs),
        read_your_writes: s.or("read_your_writes", ReadYourWrites::Lsn, errs),
        replica_fallback: s.or("replica_fallback", ReplicaFallback::Primary, errs),
        write_functions: s.or("write_functions", Vec::new(), errs),
        read_only_functions: s.or("read_only_functions", Vec::new(), errs),
        rules,
    };
    s.finish(errs);
    routing
}

fn read_shard(mut s: Section<'_>, errs: &mut Errors) -> Option<ShardConfig> {
    let primary = s.req("primary", errs);
    let replicas = s.or("replicas", Vec::new(), errs);
    s.finish(errs);
    Some(ShardConfig { primary: primary?, replicas })
}

fn read_sharded_table(mut s: Section<'_>, errs: &mut Errors) -> Option<ShardedTable> {
    let table: Option<String> = s.req("table", errs);
    let column: Option<String> = s.req("column", errs);
    let key_type: Option<KeyType> = s.req("type", errs);
    let scheme = s.or("scheme", Scheme::Hash, errs);
    let mut ranges = Vec::new();
    for mut r in s.tables("ranges", errs) {
        if let Some(shard) = r.req("shard", errs) {
            ranges.push(RangeMapping { shard, from: r.opt("from", errs), to: r.opt("to", errs) });
        }
        r.finish(errs);
    }
    let mut lists = Vec::new();
    for mut l in s.tables("values", errs) {
        let shard = l.req("shard", errs);
        let values = l.req("values", errs);
        if let (Some(shard), Some(values)) = (shard, values) {
            lists.push(ListMapping { shard, values });
        }
        l.finish(errs);
    }
    let st = ShardedTable { table: table?, column: column?, key_type: key_type?, scheme, ranges, lists };
    match st.scheme {
        Scheme::Range if st.ranges.is_empty() => {
            errs.push(ConfigError::new(s.key_path("ranges"), "scheme = \"range\" needs at least one range"));
        }
        Scheme::List if st.lists.is_empty() => {
            errs.push(ConfigError::new(s.key_path("values"), "scheme = \"list\" needs at least one list"));
        }
        _ => {}
    }
    s.finish(errs);
    Some(st)
}

fn read_sharding(mut s: Section<'_>, errs: &mut Errors) -> ShardingConfig {
    let sharding = ShardingConfig {
        cross_shard_reads: s.or("cross_shard_reads", CrossShard::Allow, errs),
        cross_shard_writes: s.or("cross_shard_writes", CrossShard::Deny, errs),
        home_shard: s.or("home_shard", 0, errs),
    };
    s.finish(errs);
    sharding
}

fn check(db: &DatabaseConfig, s: &Section<'_>, errs: &mut Errors) {
    let mut err = |key: &str, msg: String| errs.push(ConfigError::new(s.key_path(key), msg));
    if db.name.is_empty() {
        err("name", "must not be empty".into());
    }
    if db.name == ADMIN_DATABASE {
        err("name", format!("\"{ADMIN_DATABASE}\" is reserved for the admin console"));
    }
    if db.pool_size == 0 {
        err("pool_size", "must be at least 1".into());
    }
    if db.min_pool_size > db.pool_size {
        err("min_pool_size", format!("{} is larger than pool_size ({})", db.min_pool_size, db.pool_size));
    }
    if db.server_tls == ServerTls::VerifyFull && db.server_tls_ca.is_none() {
        err("server_tls_ca", "required when server_tls is \"verify-full\"".into());
    }
    let shards = db.shards.len();
    if shards == 0 {
        err("shards", "at least one [[databases.shards]] entry (with a primary) is required".into());
        return;
    }
    if db.sharding.home_shard >= shards {
        err(
            "sharding.home_shard",
            format!("{} is not a shard index (there are {shards} shards)", db.sharding.home_shard),
        );
    }
    for (i, rule) in db.routing.rules.iter().enumerate() {
        if rule.route == RuleRoute::AllShards {
            err(
                &format!("routing.rules[{i}].route"),
                "\"all_shards\" needs cross-shard fan-out, which this build does not have yet".into(),
            );
        }
        if let RuleRoute::Shard(n) = rule.route
            && n >= shards
        {
            err(&format!("routing.rules[{i}].route"), format!("shard:{n} does not exist (there are {shards} shards)"));
        }
    }
    for (i, t) in db.sharded_tables.iter().enumerate() {
        let mapped = t.ranges.iter().map(|r| r.shard).chain(t.lists.iter().map(|l| l.shard));
        for shard in mapped.filter(|&n| n >= shards) {
            err(
                &format!("sharded_tables[{i}]"),
                format!("maps keys to shard {shard}, which does not exist (there are {shards} shards)"),
            );
        }
    }
}
