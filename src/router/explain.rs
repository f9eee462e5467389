//! `pgrouter explain`: where a statement would go and why, from the config alone (no server
//! is contacted, so live state — replica health, lag, read-your-writes — is described rather
//! than applied).

use std::fmt::Write as _;

use super::classify::TxControl;
use super::hint::{self, SessionCommand};
use super::policy::Undecided;
use super::sharded::{ShardRoute, Shards, Values};
use super::{Policy, Router, Target};
use crate::config::{DatabaseConfig, PoolMode};

/// A human-readable explanation, one `key: value` per line.
#[must_use]
pub fn explain(db: &DatabaseConfig, sql: &str) -> String {
    let policy = Policy::new(db);
    let router = Router::new(16);
    let mut out = String::new();
    let line = |out: &mut String, key: &str, value: &str| {
        let _ = writeln!(out, "{key:<12} {value}");
    };
    line(&mut out, "database:", &format!("{} ({} pooling)", db.name, db.pool_mode));
    line(&mut out, "statement:", sql.trim());
    if db.pool_mode == PoolMode::Session {
        line(&mut out, "route:", &format!("primary of shard {}", policy.home()));
        line(&mut out, "reason:", "session pooling: the whole session runs on the primary");
        return out;
    }
    if let Some(cmd) = hint::session_command(sql.as_bytes()) {
        let what = match cmd {
            Ok(SessionCommand::SetRoute(Some(h))) => {
                format!("answered by pgrouter: later statements of the session go to the {}", h.as_str())
            }
            Ok(SessionCommand::SetRoute(None) | SessionCommand::ResetRoute) => {
                "answered by pgrouter: routing returns to normal".into()
            }
            Ok(SessionCommand::ShowRoute) => "answered by pgrouter".into(),
            Err(e) => format!("error: {e}"),
        };
        line(&mut out, "route:", "none (not forwarded)");
        line(&mut out, "reason:", &what);
        return out;
    }
    let hints = match hint::parse_hints(sql.as_bytes()) {
        Ok(h) => h,
        Err(e) => {
            line(&mut out, "route:", "none");
            line(&mut out, "reason:", &format!("error: {e}"));
            return out;
        }
    };
    let mut shape = crate::router::shape::Shape::default();
    let class = router.classify(sql.as_bytes(), &mut shape);
    let values = Values { sql: sql.as_bytes(), literals: &shape.literals, params: None };
    let route = policy.shards.route(&class.tables, &values);
    let keyed = match policy.shards.request_shards(std::slice::from_ref(&route), policy.home()) {
        Ok(Shards::One(keyed)) => keyed,
        Ok(Shards::Split(rows)) => {
            let mut shards: Vec<String> = rows.iter().map(ToString::to_string).collect();
            shards.dedup();
            line(&mut out, "route:", "one INSERT per shard with that shard's rows (outside a transaction)");
            line(&mut out, "reason:", &format!("the rows' keys are on shards {}", shards.join(", ")));
            return out;
        }
        Ok(Shards::Every(why)) => {
            let copy = super::copy::copy_from_stdin(sql);
            let route = match copy {
                Some(Ok(copy)) => Some(format!(
                    "every shard's primary, each row to its key's shard ({} format, outside a transaction)",
                    if copy.format.csv { "CSV" } else { "text" }
                )),
                Some(Err(e)) => Some(format!("none: {e}")),
                None if class.tables.ddl => Some(
                    "every shard's primary (inside a transaction: on the transaction's shard, then on the others at \
                     COMMIT)"
                        .to_owned(),
                ),
                None => None,
            };
            if let Some(route) = route {
                line(&mut out, "route:", &route);
                line(&mut out, "reason:", &format!("needs every shard: {why}"));
                return out;
            }
            let how = match (class.tables.aggregates.is_empty(), class.tables.ordered) {
                (false, _) => Ok("aggregates combined"),
                (true, true) => {
                    super::keys::ordered_merge(sql).map(|_| "rows merged in ORDER BY order, then LIMIT/OFFSET")
                }
                (true, false) => Ok("rows concatenated"),
            };
            let route = match (class.tables.unmergeable, how) {
                (Some(what), _) | (None, Err(what)) => format!("none: merging {what} across shards is not built yet"),
                (None, Ok(how)) => {
                    format!("every shard's primary, {how} (outside a transaction, unnamed statements only)")
                }
            };
            line(&mut out, "route:", &route);
            line(&mut out, "reason:", &format!("needs every shard: {why}"));
            return out;
        }
        Err(e) => {
            line(&mut out, "route:", "none");
            line(&mut out, "reason:", &format!("error: {e}"));
            return out;
        }
    };
    match &route {
        ShardRoute::One { shard, table, key } => {
            line(&mut out, "shard key:", &format!("{table} key {key} -> shard {shard}"));
        }
        ShardRoute::Unbound => line(&mut out, "shard key:", "a parameter: the value bound at run time picks the shard"),
        _ => {}
    }
    if let Some(TxControl::Begin { modes, .. } | TxControl::SetTransaction { modes }) = class.tx {
        let d = policy.transaction(modes.on_standby(), &hints, None, keyed);
        line(
            &mut out,
            "route:",
            &format!(
                "held by pgrouter; the transaction's first statement starts it on the {} of shard {}",
                d.target.as_str(),
                d.shard
            ),
        );
        line(&mut out, "reason:", &d.why.to_string());
        return out;
    }
    match policy.decide(sql.as_bytes(), &class, &hints, None, keyed) {
        Ok(d) => {
            line(&mut out, "route:", &format!("{} of shard {}", d.target.as_str(), d.shard));
            line(&mut out, "reason:", &d.why.to_string());
            if d.target != Target::Primary {
                line(
                    &mut out,
                    "at run time:",
                    "a replica within max_replica_lag that has replayed the client's last write; else the primary (replica_fallback)",
                );
            }
        }
        Err(Undecided::NeedVolatility(functions)) => {
            let d = policy.read(policy.home(), super::Why::Read);
            line(
                &mut out,
                "route:",
                &format!(
                    "{} of shard {}, unless one of these is a VOLATILE user function: {}",
                    d.target.as_str(),
                    d.shard,
                    functions.join(", ")
                ),
            );
            line(
                &mut out,
                "reason:",
                "classification: read; pgrouter looks the functions up in pg_proc on the primary at run time",
            );
        }
        Err(Undecided::Invalid(e)) => {
            line(&mut out, "route:", "none");
            line(&mut out, "reason:", &format!("error: {e}"));
        }
    }
    if !class.functions.is_empty() {
        line(&mut out, "functions:", &class.functions.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn db() -> DatabaseConfig {
        let text = "[[users]]\nname = \"u\"\npassword = \"p\"\n[[databases]]\nname = \"app\"\n\
                    [[databases.shards]]\nprimary = \"h:1\"\nreplicas = [\"h:2\"]\n";
        Config::from_toml(text).unwrap().databases.remove(0)
    }

    #[test]
    fn explains_routes_and_reasons() {
        let e = explain(&db(), "select * from t");
        assert!(e.contains("route:       replica of shard 0") && e.contains("classification: read"), "{e}");
        let e = explain(&db(), "select * from t for update");
        assert!(e.contains("primary of shard 0") && e.contains("locking clause"), "{e}");
        let e = explain(&db(), "/* pgrouter: route=primary */ select 1");
        assert!(e.contains("hint: /* pgrouter: route=primary */"), "{e}");
        let e = explain(&db(), "begin read only");
        assert!(e.contains("held by pgrouter") && e.contains("replica"), "{e}");
        let e = explain(&db(), "select my_func(1)");
        assert!(e.contains("unless one of these is a VOLATILE user function: my_func"), "{e}");
    }
}
