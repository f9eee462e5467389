//! Which shard a statement on a sharded database goes to (DESIGN §5): the statement's facts
//! (`keys::TableUse`) are matched against the database's `[[databases.sharded_tables]]`, and
//! the key values found are placed with `sharding::Placement`.

use std::borrow::Cow;

use super::ShardId;
use super::keys::{Equality, TableUse, ValueRef, literal_text};
use crate::config::{DatabaseConfig, ShardedTable};
use crate::sharding::{Key, Placement};

/// A key value as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawValue<'a> {
    Text(Cow<'a, str>),
    /// The bytes and the type OID the Parse declared (0: none).
    Binary(&'a [u8], u32),
    Null,
}

/// Where a statement's values come from: the text's literals and, for the extended protocol,
/// the Bind parameters (`formats` as the Bind message gives them).
pub struct Values<'a> {
    pub sql: &'a [u8],
    pub literals: &'a [(usize, usize)],
    pub params: Option<BindParams<'a>>,
}

/// A Bind message's parameter values and format codes, with the parameter types its
/// statement's Parse declared.
#[derive(Debug, Clone, Default)]
pub struct BindParams<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
    pub types: Vec<u32>,
}

impl<'a> BindParams<'a> {
    /// Reads a Bind message body.
    #[must_use]
    pub fn parse(body: &'a [u8]) -> Option<Self> {
        let bind = crate::protocol::messages::parse_bind(body)?;
        Some(Self { formats: bind.param_formats, values: bind.values, types: Vec::new() })
    }

    fn binary(&self, index: usize) -> bool {
        match self.formats.as_slice() {
            [] => false,
            [one] => *one == 1,
            many => many.get(index) == Some(&1),
        }
    }
}

impl Values<'_> {
    fn raw(&self, v: &ValueRef) -> Option<RawValue<'_>> {
        match v {
            ValueRef::Null => Some(RawValue::Null),
            ValueRef::Other => None,
            ValueRef::Literal { ordinal, negative } => {
                let text = literal_text(self.sql, *self.literals.get(*ordinal)?)?;
                Some(RawValue::Text(Cow::Owned(if *negative { format!("-{text}") } else { text })))
            }
            ValueRef::Param(n) => {
                let params = self.params.as_ref()?;
                let index = n.checked_sub(1)?;
                match params.values.get(index)? {
                    None => Some(RawValue::Null),
                    Some(bytes) if params.binary(index) => {
                        Some(RawValue::Binary(bytes, params.types.get(index).copied().unwrap_or(0)))
                    }
                    Some(bytes) => Some(RawValue::Text(String::from_utf8_lossy(bytes))),
                }
            }
        }
    }
}

/// Where a statement goes among the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardRoute {
    /// It names no table at all: any shard can run it.
    Any,
    /// Its key is a parameter whose Bind has not been seen (a Parse before its Bind): the
    /// Bind decides.
    Unbound,
    /// It touches no sharded table.
    Home,
    /// Every sharded table it touches is pinned to this shard by its key.
    One { shard: ShardId, table: String, key: String },
    /// It touches sharded tables without a usable key (or is DDL on one): every shard.
    All { why: String },
    /// A multi-row INSERT whose rows belong to different shards: the shard of each row.
    Split { rows: Vec<ShardId> },
    /// It cannot be routed correctly.
    Refused(String),
}

struct Table {
    /// As configured, lower-cased; maybe schema-qualified.
    name: String,
    column: String,
    placement: Result<Placement, String>,
}

impl Table {
    /// Does a name from a statement mean this table? Names compare by their last part, and
    /// by schema too when both have one.
    fn is(&self, name: &str) -> bool {
        let split = |n: &str| match n.rsplit_once('.') {
            Some((schema, bare)) => (Some(schema.to_owned()), bare.to_owned()),
            None => (None, n.to_owned()),
        };
        let (their_schema, their_bare) = split(name);
        let (our_schema, our_bare) = split(&self.name);
        their_bare == our_bare && (their_schema.is_none() || our_schema.is_none() || their_schema == our_schema)
    }
}

/// A database's sharded tables.
pub struct ShardMap {
    tables: Vec<Table>,
}

impl ShardMap {
    #[must_use]
    pub fn new(db: &DatabaseConfig) -> Self {
        let table = |t: &ShardedTable| Table {
            name: t.table.to_lowercase(),
            column: t.column.to_lowercase(),
            placement: Placement::new(t, db.shards.len()).map_err(|e| format!("sharded table {}: {e}", t.table)),
        };
        Self { tables: db.sharded_tables.iter().map(table).collect() }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Routes one statement by its facts.
    #[must_use]
    pub fn route(&self, facts: &TableUse, values: &Values<'_>) -> ShardRoute {
        if facts.tables.is_empty() {
            return ShardRoute::Any;
        }
        let touched: Vec<&Table> = self.tables.iter().filter(|t| facts.tables.iter().any(|n| t.is(n))).collect();
        if touched.is_empty() {
            return ShardRoute::Home;
        }
        if facts.ddl {
            return ShardRoute::All { why: format!("DDL on sharded table {}", touched[0].name) };
        }
        if facts.several {
            return ShardRoute::All { why: "several statements in one query on sharded tables".into() };
        }
        let mut chosen: Option<(usize, &Table, String)> = None;
        let mut keyless = Vec::new();
        for table in &touched {
            let placement = match &table.placement {
                Ok(p) => p,
                Err(e) => return ShardRoute::Refused(e.clone()),
            };
            let found = match self.key_of(table, placement, facts, values) {
                Ok(found) => found,
                Err(e) if e == SPLIT => return row_shards(table, placement, facts, values),
                Err(e) => return ShardRoute::Refused(e),
            };
            let Some((shard, key)) = found else {
                keyless.push(table.name.as_str());
                continue;
            };
            match &chosen {
                Some((other, other_table, other_key)) if *other != shard => {
                    return ShardRoute::Refused(format!(
                        "the statement's keys are on different shards: {}={other_key} on shard {other}, {}={key} on shard {shard}",
                        other_table.name, table.name
                    ));
                }
                Some(_) => {}
                None => chosen = Some((shard, table, key)),
            }
        }
        match chosen {
            // tables joined with a keyed one are taken to be co-located with it
            Some((shard, table, key)) => ShardRoute::One { shard: ShardId(shard), table: table.name.clone(), key },
            None if values.params.is_none() && mentions_params(facts) => ShardRoute::Unbound,
            None => ShardRoute::All { why: format!("no shard key for {}", keyless.join(", ")) },
        }
    }

    /// The one shard a request's statements need (None: any shard will do), or why they
    /// cannot run on one shard.
    pub fn request_shard(&self, routes: &[ShardRoute], home: ShardId) -> Result<Option<ShardId>, String> {
        match self.request_shards(routes, home)? {
            Shards::One(shard) => Ok(shard),
            Shards::Every(why) => Err(needs_every_shard(&why, "it cannot run on one shard")),
            Shards::Split(_) => {
                Err("the INSERT's rows belong to different shards, and it cannot run on one shard".into())
            }
        }
    }

    /// Like [`ShardMap::request_shard`], but a single statement that needs every shard is
    /// reported as such rather than refused.
    pub fn request_shards(&self, routes: &[ShardRoute], home: ShardId) -> Result<Shards, String> {
        let mut chosen: Option<ShardId> = None;
        let decided = routes.iter().filter(|r| !matches!(r, ShardRoute::Any | ShardRoute::Unbound)).count();
        for route in routes {
            let shard = match route {
                ShardRoute::Any | ShardRoute::Unbound => continue,
                ShardRoute::Home => home,
                ShardRoute::One { shard, .. } => *shard,
                ShardRoute::Refused(why) => return Err(why.clone()),
                ShardRoute::All { why } if decided == 1 => return Ok(Shards::Every(why.clone())),
                ShardRoute::Split { rows } if decided == 1 => return Ok(Shards::Split(rows.clone())),
                ShardRoute::Split { .. } => {
                    return Err("an INSERT whose rows belong to different shards must be sent alone".into());
                }
                ShardRoute::All { why } => {
                    return Err(needs_every_shard(why, "it must be sent alone, as a simple query"));
                }
            };
            match chosen {
                Some(other) if other != shard => {
                    return Err(format!(
                        "one request needs shard {} and shard {}: send the statements separately",
                        other.0, shard.0
                    ));
                }
                _ => chosen = Some(shard),
            }
        }
        Ok(Shards::One(chosen))
    }

    /// The key column and placement of sharded table `name` (as a statement names it), if it
    /// is one.
    pub fn table(&self, name: &str) -> Option<(&str, Result<&Placement, &String>)> {
        let table = self.tables.iter().find(|t| t.is(name))?;
        Some((table.column.as_str(), table.placement.as_ref()))
    }

    /// The placement of the first sharded table the facts name (or the first configured),
    /// for a `shard_key` hint.
    pub fn hinted_key_shard(&self, facts: &TableUse, key: &str) -> Result<ShardId, String> {
        let table = self
            .tables
            .iter()
            .find(|t| facts.tables.iter().any(|n| t.is(n)))
            .or_else(|| self.tables.first())
            .ok_or_else(|| "a shard_key hint needs a sharded table in the config".to_owned())?;
        let placement = table.placement.as_ref().map_err(Clone::clone)?;
        let key = placement.key_from_text(key).map_err(|e| format!("shard_key hint: {e}"))?;
        placement.shard(&key).map(ShardId).map_err(|e| format!("shard_key hint: {e}"))
    }
}

/// What a request needs among the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shards {
    /// One shard (None: any will do).
    One(Option<ShardId>),
    /// Its one statement needs every shard, for this reason.
    Every(String),
    /// Its one statement is an INSERT whose rows go to these shards, row by row.
    Split(Vec<ShardId>),
}

/// The error for a statement that needs every shard but cannot have them.
#[must_use]
pub fn needs_every_shard(why: &str, because: &str) -> String {
    format!(
        "the statement needs every shard ({why}), and {because}: add the shard key to the WHERE clause, \
         or a /* pgrouter: shard=N */ hint"
    )
}

/// `key_of` found an INSERT whose rows belong to different shards.
const SPLIT: &str = "rows on several shards";

/// The shard of each row of a multi-row INSERT into `table`.
fn row_shards(table: &Table, placement: &Placement, facts: &TableUse, values: &Values<'_>) -> ShardRoute {
    let Some(insert) = &facts.insert else { return ShardRoute::Refused("not an INSERT".into()) };
    let Some(index) = insert.columns.iter().position(|c| *c == table.column) else {
        return ShardRoute::Refused(format!("INSERT into sharded table {} must give its shard key", table.name));
    };
    let mut shards = Vec::new();
    for row in insert.rows.iter().flatten() {
        let Some(value) = row.get(index) else { return ShardRoute::Refused("an INSERT row is short of values".into()) };
        match same_shard(table, placement, &[value], values) {
            Ok(Spread::One(shard, _)) => shards.push(ShardId(shard)),
            Ok(_) => return ShardRoute::All { why: format!("a row of {} has no usable key", table.name) },
            Err(e) => return ShardRoute::Refused(e),
        }
    }
    ShardRoute::Split { rows: shards }
}

fn mentions_params(facts: &TableUse) -> bool {
    let param = |v: &ValueRef| matches!(v, ValueRef::Param(_));
    facts.equalities.iter().any(|e| e.values.iter().any(param))
        || facts.insert.as_ref().and_then(|i| i.rows.as_ref()).is_some_and(|rows| rows.iter().flatten().any(param))
}

impl ShardMap {
    /// The shard `table`'s key pins the statement to, if the facts name one.
    fn key_of(
        &self,
        table: &Table,
        placement: &Placement,
        facts: &TableUse,
        values: &Values<'_>,
    ) -> Result<Option<(usize, String)>, String> {
        if let Some(insert) = facts.insert.as_ref().filter(|i| table.is(&i.table)) {
            if insert.columns.is_empty() {
                return Err(format!(
                    "INSERT into sharded table {} needs a column list: pgrouter finds the shard key {} by name",
                    table.name, table.column
                ));
            }
            let Some(index) = insert.columns.iter().position(|c| *c == table.column) else {
                return Err(format!(
                    "INSERT into sharded table {} must give its shard key {}",
                    table.name, table.column
                ));
            };
            let Some(rows) = &insert.rows else { return Ok(None) };
            let keys: Vec<&ValueRef> = rows.iter().filter_map(|row| row.get(index)).collect();
            return match same_shard(table, placement, &keys, values)? {
                Spread::One(shard, key) => Ok(Some((shard, key))),
                Spread::Unknown => Ok(None),
                Spread::Several => Err(SPLIT.into()),
            };
        }
        let equality = facts
            .equalities
            .iter()
            .find(|e: &&Equality| e.column == table.column && e.table.as_deref().is_none_or(|t| table.is(t)));
        match equality {
            // an IN list over several shards is a statement for all of them
            Some(e) => match same_shard(table, placement, &e.values.iter().collect::<Vec<_>>(), values)? {
                Spread::One(shard, key) => Ok(Some((shard, key))),
                Spread::Unknown | Spread::Several => Ok(None),
            },
            None => Ok(None),
        }
    }
}

/// Where a list of key values places.
enum Spread {
    One(usize, String),
    Several,
    /// A value is not usable as a key (an expression, a parameter not bound yet).
    Unknown,
}

fn same_shard(table: &Table, placement: &Placement, keys: &[&ValueRef], values: &Values<'_>) -> Result<Spread, String> {
    let mut found: Option<(usize, Key)> = None;
    for v in keys {
        let key = match values.raw(v) {
            None => return Ok(Spread::Unknown),
            Some(RawValue::Null) => {
                return Err(format!("the shard key {} of {} cannot be NULL", table.column, table.name));
            }
            Some(RawValue::Text(t)) => placement.key_from_text(&t),
            Some(RawValue::Binary(b, declared)) => placement.key_from_binary(b, declared),
        }
        .map_err(|e| format!("{}.{}: {e}", table.name, table.column))?;
        let shard = placement.shard(&key).map_err(|e| format!("{}: {e}", table.name))?;
        match &found {
            Some((s, _)) if *s != shard => return Ok(Spread::Several),
            Some(_) => {}
            None => found = Some((shard, key)),
        }
    }
    Ok(found.map_or(Spread::Unknown, |(s, k)| Spread::One(s, k.to_string())))
}

#[cfg(test)]
mod tests;
