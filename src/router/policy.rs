//! One database's routing policy: hints, then rules, then the classification, then the
//! `reads` setting; plus the cache of which user functions PostgreSQL marks VOLATILE.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::ShardId;
use super::classify::{Access, Classification, bare_name};
use super::hint::{Hints, RouteHint};
use super::keys::TableUse;
use super::sharded::ShardMap;
use std::time::Duration;

use crate::config::{
    CrossShard, DatabaseConfig, LoadBalance, ReadYourWrites, ReadsTo, ReplicaFallback, RoutingRule, RuleRoute,
};

/// How long a looked-up function volatility is trusted.
const VOLATILITY_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Which kind of server a statement needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
    /// `reads = "any"`: the primary or a replica, whichever the balancer picks.
    Any,
}

impl Target {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::Any => "any",
        }
    }
}

/// Why a decision was made, for logs and `pgrouter explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    Hint(RouteHint),
    SessionSetting(RouteHint),
    Rule(usize),
    Write(String),
    WriteFunction(String),
    VolatileFunction(String),
    WriteTransaction,
    ReadOnlyTransaction,
    Read,
    ReadsSetting(ReadsTo),
    NoReplicas,
    /// A read sent to the primary because the client wrote recently (read_your_writes).
    ReadYourWrites,
    /// A read sent to the primary because no replica qualified (replica_fallback).
    Fallback(String),
    /// Session pooling keeps each client on the primary of its home shard.
    SessionPooling,
}

impl Why {
    /// Whether the decision was made because the statement (or transaction) may write, as
    /// opposed to a read that ended up on the primary.
    #[must_use]
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Self::Read
                | Self::ReadsSetting(_)
                | Self::NoReplicas
                | Self::ReadYourWrites
                | Self::Fallback(_)
                | Self::ReadOnlyTransaction
        )
    }

    /// Whether a hint, the session's `pgrouter.route` or a routing rule chose the target:
    /// such a decision says nothing about whether the statement writes (see
    /// [`Policy::may_write`]).
    #[must_use]
    pub fn forced(&self) -> bool {
        matches!(self, Self::Hint(_) | Self::SessionSetting(_) | Self::Rule(_))
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hint(h) => write!(f, "hint: /* pgrouter: route={} */", h.as_str()),
            Self::SessionSetting(h) => {
                write!(f, "session setting: SET pgrouter.route = '{}'", h.as_str())
            }
            Self::Rule(i) => write!(f, "rule: [[databases.routing.rules]] #{i} matched"),
            Self::Write(reason) => write!(f, "classification: write ({reason})"),
            Self::WriteFunction(name) => write!(f, "classification: write (calls {name}, listed in write_functions)"),
            Self::VolatileFunction(name) => {
                write!(f, "classification: write (calls {name}, a VOLATILE function not in read_only_functions)")
            }
            Self::WriteTransaction => f.write_str("classification: write (opens a read-write transaction block)"),
            Self::ReadOnlyTransaction => f.write_str("classification: read-only transaction"),
            Self::Read => f.write_str("classification: read"),
            Self::ReadsSetting(r) => write!(f, "classification: read, and reads = \"{r}\""),
            Self::NoReplicas => f.write_str("classification: read, but the shard has no replicas"),
            Self::ReadYourWrites => f.write_str("read-your-writes: this client wrote recently"),
            Self::Fallback(why) => write!(f, "fallback: no replica available ({why})"),
            Self::SessionPooling => f.write_str("session pooling: the whole session runs on the primary"),
        }
    }
}

/// Where one statement (or one transaction) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub shard: ShardId,
    pub target: Target,
    pub why: Why,
}

/// Why no decision could be made yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undecided {
    /// These user functions' volatility must be looked up on the primary first.
    NeedVolatility(Vec<String>),
    /// The statement asks for something impossible (a hint naming a missing shard).
    Invalid(String),
}

pub struct Policy {
    pub database: String,
    pub load_balance: LoadBalance,
    pub max_replica_lag: Duration,
    pub read_your_writes: ReadYourWrites,
    pub replica_fallback: ReplicaFallback,
    reads: ReadsTo,
    rules: Vec<RoutingRule>,
    write_functions: Vec<String>,
    read_only_functions: Vec<String>,
    home: ShardId,
    /// Per shard: does it have replicas?
    replicas: Vec<bool>,
    /// The sharded tables and where their keys place rows.
    pub shards: ShardMap,
    /// May a read without a shard key run on every shard?
    pub cross_shard_reads: bool,
    /// May a write without a shard key run on every shard?
    pub cross_shard_writes: bool,
    /// User function name as called -> VOLATILE and user-defined.
    /// Function name as called -> (VOLATILE and user-defined, when looked up). Entries expire
    /// after [`VOLATILITY_TTL`], so a migration that creates or changes a function is noticed.
    volatile: RwLock<HashMap<String, (bool, Instant)>>,
}

impl Policy {
    #[must_use]
    pub fn new(db: &DatabaseConfig) -> Arc<Self> {
        Arc::new(Self {
            database: db.name.clone(),
            load_balance: db.routing.load_balance,
            max_replica_lag: db.routing.max_replica_lag,
            read_your_writes: db.routing.read_your_writes,
            replica_fallback: db.routing.replica_fallback,
            reads: db.routing.reads,
            rules: db.routing.rules.clone(),
            write_functions: db.routing.write_functions.iter().map(|f| f.to_lowercase()).collect(),
            read_only_functions: db.routing.read_only_functions.iter().map(|f| f.to_lowercase()).collect(),
            home: ShardId(db.sharding.home_shard),
            replicas: db.shards.iter().map(|s| !s.replicas.is_empty()).collect(),
            shards: ShardMap::new(db),
            cross_shard_reads: db.sharding.cross_shard_reads == CrossShard::Allow,
            cross_shard_writes: db.sharding.cross_shard_writes == CrossShard::Allow,
            volatile: RwLock::new(HashMap::new()),
        })
    }

    #[must_use]
    pub fn home(&self) -> ShardId {
        self.home
    }

    #[must_use]
    pub fn has_replicas(&self, shard: ShardId) -> bool {
        self.replicas.get(shard.0).copied().unwrap_or(false)
    }

    /// Decides where `sql` goes outside a transaction block; `keyed` is the shard its shard
    /// keys chose (see `sharded::ShardMap::request_shard`), which a shard hint overrides.
    pub fn decide(
        &self,
        sql: &[u8],
        class: &Classification,
        hints: &Hints,
        session: Option<RouteHint>,
        keyed: Option<ShardId>,
    ) -> Result<Decision, Undecided> {
        let shard = self.hinted_shard(hints, keyed)?;
        let decided = |target, why| Ok(Decision { shard, target, why });
        if let Some(hint) = hints.route {
            return decided(hint_target(hint), Why::Hint(hint));
        }
        if let Some(hint) = session {
            return decided(hint_target(hint), Why::SessionSetting(hint));
        }
        if let Some(decision) = self.match_rule(sql, shard) {
            return Ok(decision);
        }
        if let Access::Write(reason) = &class.access {
            return decided(Target::Primary, Why::Write(reason.clone()));
        }
        if class.opens_write_transaction {
            return decided(Target::Primary, Why::WriteTransaction);
        }
        if let Some(why) = self.function_verdict(&class.functions)? {
            return decided(Target::Primary, why);
        }
        Ok(self.read(shard, Why::Read))
    }

    /// Whether a statement may change data, as `decide` would judge it without hints,
    /// settings or rules. A called function whose volatility is not known yet counts as a
    /// write (nothing is looked up for this).
    #[must_use]
    pub fn may_write(&self, class: &Classification) -> bool {
        matches!(class.access, Access::Write(_))
            || class.opens_write_transaction
            || !matches!(self.function_verdict(&class.functions), Ok(None))
    }

    /// The shard the hints name, else `keyed`, else the home shard; or why the hints are
    /// unusable. A `shard_key` hint is placed as the first configured sharded table's key.
    pub fn hinted_shard(&self, hints: &Hints, keyed: Option<ShardId>) -> Result<ShardId, Undecided> {
        if let Some(key) = &hints.shard_key {
            return self.shards.hinted_key_shard(&TableUse::default(), key).map_err(Undecided::Invalid);
        }
        match hints.shard {
            Some(n) if n >= self.replicas.len() => Err(Undecided::Invalid(format!(
                "hint shard={n} names a shard that does not exist (database \"{}\" has {})",
                self.database,
                self.replicas.len()
            ))),
            Some(n) => Ok(ShardId(n)),
            None => Ok(keyed.unwrap_or(self.home)),
        }
    }

    /// Where a read goes given `reads` and whether the shard has replicas.
    #[must_use]
    pub fn read(&self, shard: ShardId, why: Why) -> Decision {
        let (target, why) = match self.reads {
            ReadsTo::Primary => (Target::Primary, Why::ReadsSetting(ReadsTo::Primary)),
            _ if !self.has_replicas(shard) => (Target::Primary, Why::NoReplicas),
            ReadsTo::Any => (Target::Any, Why::ReadsSetting(ReadsTo::Any)),
            ReadsTo::Replicas => (Target::Replica, why),
        };
        Decision { shard, target, why }
    }

    /// Where an explicit transaction goes once its first statement arrives.
    #[must_use]
    pub fn transaction(
        &self,
        read_only: bool,
        hints: &Hints,
        session: Option<RouteHint>,
        keyed: Option<ShardId>,
    ) -> Decision {
        // callers check the hints with `hinted_shard` first
        let shard = self.hinted_shard(hints, keyed).unwrap_or(self.home);
        if let Some(hint) = hints.route.or(session) {
            let why = if hints.route.is_some() { Why::Hint(hint) } else { Why::SessionSetting(hint) };
            return Decision { shard, target: hint_target(hint), why };
        }
        if read_only {
            self.read(shard, Why::ReadOnlyTransaction)
        } else {
            Decision { shard, target: Target::Primary, why: Why::WriteTransaction }
        }
    }

    /// True if the statement's shard is the client's or the operator's word (a `shard` or
    /// `shard_key` hint, a `shard:N` rule), so its shard key does not decide.
    #[must_use]
    pub fn shard_is_given(&self, sql: &[u8], hints: &Hints) -> bool {
        hints.shard.is_some()
            || hints.shard_key.is_some()
            || std::str::from_utf8(sql).is_ok_and(|text| {
                self.rules
                    .iter()
                    .find(|r| r.pattern.is_match(text))
                    .is_some_and(|r| matches!(r.route, RuleRoute::Shard(_)))
            })
    }

    fn match_rule(&self, sql: &[u8], shard: ShardId) -> Option<Decision> {
        if self.rules.is_empty() {
            return None;
        }
        let text = std::str::from_utf8(sql).ok()?;
        let (i, rule) = self.rules.iter().enumerate().find(|(_, r)| r.pattern.is_match(text))?;
        let (shard, target) = match rule.route {
            RuleRoute::Primary => (shard, Target::Primary),
            RuleRoute::Replica => (shard, Target::Replica),
            RuleRoute::Shard(n) => (ShardId(n), Target::Primary),
            // rejected by config validation until fan-out exists
            RuleRoute::AllShards => (shard, Target::Primary),
        };
        Some(Decision { shard, target, why: Why::Rule(i) })
    }

    /// Applies write_functions, read_only_functions and the VOLATILE cache to the called
    /// functions: `Some(why)` if one makes the statement a write.
    fn function_verdict(&self, functions: &[String]) -> Result<Option<Why>, Undecided> {
        if functions.is_empty() {
            // most statements: no lock taken
            return Ok(None);
        }
        let mut unknown = Vec::new();
        let volatile = self.volatile.read().expect("volatility lock");
        let fresh = |f: &String| volatile.get(f).filter(|(_, at)| at.elapsed() < VOLATILITY_TTL).map(|(v, _)| *v);
        for f in functions {
            if listed(&self.write_functions, f) {
                return Ok(Some(Why::WriteFunction(f.clone())));
            }
            if listed(&self.read_only_functions, f) {
                continue;
            }
            match fresh(f) {
                Some(true) => return Ok(Some(Why::VolatileFunction(f.clone()))),
                Some(false) => {}
                None => unknown.push(f.clone()),
            }
        }
        if unknown.is_empty() { Ok(None) } else { Err(Undecided::NeedVolatility(unknown)) }
    }

    /// Records looked-up volatility: `true` for a VOLATILE user-defined function.
    pub fn learn_volatility(&self, results: impl IntoIterator<Item = (String, bool)>) {
        let now = Instant::now();
        self.volatile.write().expect("volatility lock").extend(results.into_iter().map(|(name, v)| (name, (v, now))));
    }

    /// The functions (among `names`) whose volatility is not known yet.
    #[must_use]
    pub fn unknown_functions(&self, names: &[String]) -> Vec<String> {
        let volatile = self.volatile.read().expect("volatility lock");
        names
            .iter()
            .filter(|n| volatile.get(*n).is_none_or(|(_, at)| at.elapsed() >= VOLATILITY_TTL))
            .cloned()
            .collect()
    }
}

fn hint_target(hint: RouteHint) -> Target {
    match hint {
        RouteHint::Primary => Target::Primary,
        RouteHint::Replica => Target::Replica,
    }
}

/// Whether a called function matches a config list entry: exactly, or by bare name when
/// either side is unqualified.
fn listed(list: &[String], called: &str) -> bool {
    list.iter().any(|entry| {
        entry == called
            || (!called.contains('.') && bare_name(entry) == called)
            || (!entry.contains('.') && bare_name(called) == entry)
    })
}

/// SQL that returns, for each name, whether it names a VOLATILE function outside
/// `pg_catalog` and `information_schema` (built-in functions are judged by name only, in
/// `classify`). Unqualified names match any schema: if any such function is volatile the
/// call counts as a write (fail closed).
#[must_use]
pub fn volatility_query(names: &[String]) -> String {
    let rows: Vec<String> = names
        .iter()
        .map(|name| {
            let (schema, func) = match name.rsplit_once('.') {
                Some((s, f)) => (quote_literal(s), quote_literal(f)),
                None => ("NULL".to_owned(), quote_literal(name)),
            };
            format!("({}, {schema}, {func})", quote_literal(name))
        })
        .collect();
    format!(
        "SELECT f.name, coalesce(bool_or(p.provolatile = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND (f.nsp IS NULL OR n.nspname = f.nsp)), false) \
         FROM (VALUES {}) AS f(name, nsp, fn) \
         LEFT JOIN pg_proc p ON p.proname = f.fn \
         LEFT JOIN pg_namespace n ON n.oid = p.pronamespace \
         GROUP BY f.name",
        rows.join(", ")
    )
}

/// A string literal that means the same whatever `standard_conforming_strings` says.
#[must_use]
pub fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::router::classify::classify;

    fn policy(extra: &str) -> Arc<Policy> {
        let text = format!(
            "[[users]]\nname = \"u\"\npassword = \"p\"\n[[databases]]\nname = \"app\"\n{extra}\n\
             [[databases.shards]]\nprimary = \"h:1\"\nreplicas = [\"h:2\"]\n"
        );
        Policy::new(Config::from_toml(&text).unwrap().database("app").unwrap())
    }

    fn decide(p: &Policy, sql: &str) -> Result<Decision, Undecided> {
        let hints = crate::router::hint::parse_hints(sql.as_bytes()).unwrap();
        p.decide(sql.as_bytes(), &classify(sql, &[]), &hints, None, None)
    }

    #[test]
    fn order_hints_rules_classification() {
        let p = policy(
            "[databases.routing]\nwrite_functions = [\"audit.log_event\"]\nread_only_functions = [\"app.price_of\"]\n[[databases.routing.rules]]\npattern = \"(?i)from reporting\\\\.\"\nroute = \"primary\"",
        );
        assert_eq!(decide(&p, "select 1").unwrap().target, Target::Replica);
        assert_eq!(decide(&p, "insert into t values (1)").unwrap().target, Target::Primary);
        assert_eq!(decide(&p, "/* pgrouter: route=primary */ select 1").unwrap().why, Why::Hint(RouteHint::Primary));
        assert_eq!(
            decide(&p, "/* pgrouter: route=replica */ insert into t values (1)").unwrap().target,
            Target::Replica
        );
        assert_eq!(decide(&p, "select * from reporting.daily").unwrap().why, Why::Rule(0));
        assert_eq!(
            decide(&p, "select audit.log_event('x')").unwrap().why,
            Why::WriteFunction("audit.log_event".into())
        );
        assert_eq!(
            decide(&p, "select log_event('x')").unwrap().target,
            Target::Primary,
            "unqualified call of a listed writer"
        );
        assert_eq!(decide(&p, "select app.price_of(1)").unwrap().target, Target::Replica);
        assert_eq!(decide(&p, "select my_func(1)"), Err(Undecided::NeedVolatility(vec!["my_func".into()])));
        p.learn_volatility([("my_func".to_owned(), true)]);
        assert_eq!(decide(&p, "select my_func(1)").unwrap().why, Why::VolatileFunction("my_func".into()));
        assert!(matches!(decide(&p, "/* pgrouter: shard=3 */ select 1"), Err(Undecided::Invalid(_))));
    }

    #[test]
    fn reads_setting_and_transactions() {
        let p = policy("[databases.routing]\nreads = \"primary\"");
        assert_eq!(decide(&p, "select 1").unwrap().target, Target::Primary);
        let p = policy("[databases.routing]\nreads = \"any\"");
        assert_eq!(decide(&p, "select 1").unwrap().target, Target::Any);
        let p = policy("");
        assert_eq!(p.transaction(true, &Hints::default(), None, None).target, Target::Replica);
        assert_eq!(p.transaction(false, &Hints::default(), None, None).target, Target::Primary);
        assert_eq!(p.transaction(false, &Hints::default(), Some(RouteHint::Replica), None).target, Target::Replica);
    }

    #[test]
    fn a_forced_route_leaves_whether_a_statement_writes_to_the_statement() {
        let p = policy("[databases.routing]\nread_only_functions = [\"app.price_of\"]");
        let writes = |sql: &str| p.may_write(&classify(sql, &[]));
        assert!(!writes("select 1"));
        assert!(writes("insert into t values (1)"));
        assert!(writes("begin; select 1"), "opens a transaction that is not read-only");
        assert!(!writes("begin read only; select 1"));
        assert!(!writes("select app.price_of(1)"));
        assert!(writes("select my_func(1)"), "volatility not known yet");
        p.learn_volatility([("my_func".to_owned(), false)]);
        assert!(!writes("select my_func(1)"));
        assert!(decide(&p, "/* pgrouter: route=primary */ select 1").unwrap().why.forced());
        assert!(!decide(&p, "insert into t values (1)").unwrap().why.forced());
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("a'b\\c"), "E'a\\'b\\\\c'");
        let q = volatility_query(&["s.f".into(), "g".into()]);
        assert!(q.contains("(E's.f', E's', E'f')") && q.contains("(E'g', NULL, E'g')"), "{q}");
    }
}
