//! Read or write? Parses a statement with sqlparser (PostgreSQL dialect) and decides as
//! DESIGN §4 lists. Fails closed: anything not known to be a read is a write, and a
//! statement that does not parse is a write.
//!
//! The result records facts about the text only (which functions it calls, whether it opens
//! a transaction); config lists (`write_functions`, `read_only_functions`) and function
//! volatility are applied by the router, so a cached result stays valid for any config.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use sqlparser::ast::{
    CopySource, DiscardObject, Expr, ObjectName, Query, Select, Set, Statement, TableFactor, TransactionAccessMode,
    TransactionIsolationLevel, TransactionMode, UtilityOption, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// What executing a text needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Runs on a hot standby (if no called function turns out to write).
    Read,
    /// Needs the primary; the reason says why.
    Write(String),
}

/// The transaction modes a BEGIN or SET TRANSACTION names (`None`: not mentioned).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxModes {
    pub read_only: Option<bool>,
    pub serializable: Option<bool>,
}

impl TxModes {
    /// A READ ONLY transaction a hot standby can run: a standby refuses SERIALIZABLE ("cannot
    /// use serializable mode in a hot standby").
    #[must_use]
    pub fn on_standby(self) -> bool {
        self.read_only == Some(true) && self.serializable != Some(true)
    }

    /// These modes changed by a later SET TRANSACTION (what it mentions wins).
    #[must_use]
    pub fn then(self, later: TxModes) -> TxModes {
        TxModes {
            read_only: later.read_only.or(self.read_only),
            serializable: later.serializable.or(self.serializable),
        }
    }
}

/// Transaction control, when a text is exactly one such statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// BEGIN / START TRANSACTION; `tag` is the CommandComplete tag PostgreSQL answers with.
    Begin { modes: TxModes, tag: &'static str },
    /// SET TRANSACTION ...
    SetTransaction { modes: TxModes },
    /// COMMIT, END, ROLLBACK, ABORT; `tag` as PostgreSQL answers; `chain` for AND CHAIN,
    /// which starts a new transaction with the same modes.
    End { tag: &'static str, chain: bool },
    /// SAVEPOINT, RELEASE, ROLLBACK TO (only meaningful inside a transaction).
    Savepoint,
}

/// The classification of one query text (one or more statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub access: Access,
    /// Functions called (lower-cased unless quoted, schema-qualified as written), other than
    /// the built-in writers that already made `access` a write.
    pub functions: Vec<String>,
    /// Set when the text is a single transaction-control statement.
    pub tx: Option<TxControl>,
    /// The text opens a transaction block that is not read-only (BEGIN among several
    /// statements), so it must run on the primary.
    pub opens_write_transaction: bool,
    /// False when the result depends on a literal (EXPLAIN option values), so it must not be
    /// shared through the shape cache.
    pub cacheable: bool,
    /// The text may change session settings (SET, RESET, DISCARD, set_config), which the
    /// proxy must carry to the client's next server connection.
    pub session_state: bool,
    /// The text creates state that cannot move to another server connection (LISTEN, a
    /// session advisory lock, a temporary table, SQL-level PREPARE, a WITH HOLD cursor): the
    /// client must keep its connection. The reason, for logs.
    pub pins: Option<&'static str>,
    /// DISCARD ALL: the server drops every prepared statement of the connection.
    pub discards_all: bool,
    /// Tables named, WHERE equalities, INSERT rows: what sharding routes by.
    pub tables: super::keys::TableUse,
    /// How often statements of this shape ran, and where the last went (SHOW ROUTES).
    pub usage: Usage,
}

/// Counters kept with a cached classification: how many statements of its shape ran through
/// the proxy and the route of the last one (a code the caller defines; 0 = none yet). Atomic,
/// so noting a use takes no lock. They do not take part in comparisons.
#[derive(Default)]
pub struct Usage {
    count: AtomicU64,
    route: AtomicU8,
}

impl Usage {
    pub fn note(&self, route: u8) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.route.store(route, Ordering::Relaxed);
    }

    /// (statements run, last route code)
    #[must_use]
    pub fn get(&self) -> (u64, u8) {
        (self.count.load(Ordering::Relaxed), self.route.load(Ordering::Relaxed))
    }
}

impl Clone for Usage {
    fn clone(&self) -> Self {
        let (count, route) = self.get();
        Self { count: AtomicU64::new(count), route: AtomicU8::new(route) }
    }
}

impl PartialEq for Usage {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Usage {}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (count, route) = self.get();
        write!(f, "Usage {{ count: {count}, route: {route} }}")
    }
}

impl Classification {
    /// A text that cannot be classified: a write, fail closed.
    #[must_use]
    pub fn unparsable(reason: &str) -> Self {
        Self::write(format!("does not parse ({reason})"))
    }

    fn write(reason: impl Into<String>) -> Self {
        Self {
            access: Access::Write(reason.into()),
            functions: Vec::new(),
            tx: None,
            opens_write_transaction: false,
            cacheable: true,
            session_state: false,
            pins: None,
            discards_all: false,
            tables: super::keys::TableUse::default(),
            usage: Usage::default(),
        }
    }
}

/// Built-in functions that write, hold session state (DESIGN §4), or only mean something on
/// the primary (WAL positions, signalling backends), matched on the bare name.
fn builtin_writer(bare: &str) -> bool {
    matches!(
        bare,
        "pg_current_wal_lsn"
            | "pg_current_wal_insert_lsn"
            | "pg_current_wal_flush_lsn"
            | "pg_walfile_name"
            | "pg_walfile_name_offset"
            | "pg_terminate_backend"
            | "pg_cancel_backend"
            | "nextval"
            | "setval"
            | "lastval"
            | "currval"
            | "set_config"
            | "pg_notify"
            | "txid_current"
            | "pg_current_xact_id"
            | "dblink_exec"
            | "pg_switch_wal"
            | "pg_create_restore_point"
            | "pg_logical_emit_message"
            | "pg_create_physical_replication_slot"
            | "pg_create_logical_replication_slot"
            | "pg_drop_replication_slot"
    ) || bare.starts_with("lo_")
        || (bare.starts_with("pg_advisory_") || bare.starts_with("pg_try_advisory_")) && bare.contains("lock")
        || bare.starts_with("pg_replication_origin_")
}

/// The last part of a possibly qualified function name.
#[must_use]
pub fn bare_name(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Classifies one query text; `literals` are the byte ranges of its literals (from the shape
/// scan), by which shard-key values are named.
#[must_use]
pub fn classify(sql: &str, literals: &[(usize, usize)]) -> Classification {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => {
            return transaction_fallback(sql).unwrap_or_else(|| {
                let (session_state, pins) = unparsed_effects(sql);
                Classification { session_state, pins, ..Classification::write(format!("does not parse ({e})")) }
            });
        }
    };
    if statements.is_empty() {
        return Classification { access: Access::Read, ..Classification::write("") };
    }
    let mut result = Classification { access: Access::Read, ..Classification::write("") };
    let single = statements.len() == 1;
    for stmt in &statements {
        let one = classify_statement(stmt);
        if single {
            result.tx = one.tx;
        } else if let Some(TxControl::Begin { modes, .. }) = one.tx
            && !modes.on_standby()
        {
            result.opens_write_transaction = true;
        }
        if result.access == Access::Read {
            result.access = one.access;
        }
        result.functions.extend(one.functions);
        result.cacheable &= one.cacheable;
        let mut effects = Effects::default();
        let _ = stmt.visit(&mut effects);
        result.session_state |= effects.session_state;
        result.discards_all |= effects.discards_all;
        result.pins = result.pins.or(effects.pins);
    }
    result.functions.sort();
    result.functions.dedup();
    result.tables = super::keys::table_use(&statements, sql, literals);
    result
}

fn classify_statement(stmt: &Statement) -> Classification {
    let read = || Classification { access: Access::Read, ..Classification::write("") };
    let tx = |tx| Classification { tx: Some(tx), ..read() };
    match stmt {
        Statement::Query(_) | Statement::Declare { .. } => scan(stmt),
        Statement::Explain { analyze, statement, options, .. } => {
            let mut c = if *analyze || options.as_deref().is_some_and(analyze_option) {
                let inner = classify_statement(statement);
                match inner.access {
                    Access::Write(_) => Classification {
                        access: Access::Write("EXPLAIN ANALYZE runs a statement that writes".into()),
                        ..inner
                    },
                    Access::Read => inner,
                }
            } else {
                read()
            };
            c.tx = None;
            c.cacheable = options.is_none();
            c
        }
        Statement::Copy { to: true, source: CopySource::Query(_), .. } => scan(stmt),
        Statement::Copy { to: true, .. } => read(),
        Statement::Copy { to: false, .. } => Classification::write("COPY FROM writes rows"),
        // drivers ask this to find the primary (libpq target_session_attrs, pgjdbc
        // targetServerType): the answer must come from the primary
        Statement::ShowVariable { variable }
            if variable.len() == 1 && variable[0].value.eq_ignore_ascii_case("transaction_read_only") =>
        {
            Classification::write("SHOW transaction_read_only is answered by the primary")
        }
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } | Statement::ShowTables { .. } => read(),
        Statement::Fetch { .. } | Statement::Close { .. } => read(),
        Statement::StartTransaction { modes, begin, statements, .. } if statements.is_empty() => {
            tx(TxControl::Begin { modes: tx_modes(modes), tag: if *begin { "BEGIN" } else { "START TRANSACTION" } })
        }
        Statement::Set(Set::SetTransaction { modes, session: false, snapshot: None }) => {
            tx(TxControl::SetTransaction { modes: tx_modes(modes) })
        }
        Statement::Commit { chain, .. } => tx(TxControl::End { tag: "COMMIT", chain: *chain }),
        Statement::Rollback { savepoint: None, chain } => tx(TxControl::End { tag: "ROLLBACK", chain: *chain }),
        Statement::Rollback { .. } | Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
            tx(TxControl::Savepoint)
        }
        other => Classification::write(format!("{} is not a read", statement_kind(other))),
    }
}

fn tx_modes(modes: &[TransactionMode]) -> TxModes {
    let mut out = TxModes::default();
    for m in modes {
        match m {
            TransactionMode::AccessMode(a) => out.read_only = Some(*a == TransactionAccessMode::ReadOnly),
            TransactionMode::IsolationLevel(l) => {
                out.serializable = Some(*l == TransactionIsolationLevel::Serializable);
            }
        }
    }
    out
}

/// `EXPLAIN (ANALYZE)`, `(ANALYZE true)`, `(ANALYZE on)`, `(ANALYZE 1)`.
fn analyze_option(options: &[UtilityOption]) -> bool {
    options.iter().any(|o| {
        o.name.value.eq_ignore_ascii_case("analyze")
            && o.arg.as_ref().is_none_or(|arg| {
                let v = arg.to_string().to_ascii_lowercase();
                !matches!(v.trim_matches('\''), "false" | "off" | "0" | "no")
            })
    })
}

/// The first words of a statement, for messages ("INSERT", "CREATE TABLE").
fn statement_kind(stmt: &Statement) -> String {
    let text = stmt.to_string();
    let mut words = text.split_whitespace().take(2).map(str::to_ascii_uppercase);
    let first = words.next().unwrap_or_default();
    match (first.as_str(), words.next()) {
        ("CREATE" | "ALTER" | "DROP", Some(second)) => format!("{first} {second}"),
        _ => first,
    }
}

/// Walks a query-like statement for anything that makes it a write.
fn scan(stmt: &Statement) -> Classification {
    let mut finder = Finder::default();
    let _ = stmt.visit(&mut finder);
    Classification {
        access: finder.write.map_or(Access::Read, Access::Write),
        functions: finder.functions,
        ..Classification::write("")
    }
}

/// What a statement does to the session beyond its result: settings and pinned state.
#[derive(Default)]
struct Effects {
    session_state: bool,
    discards_all: bool,
    pins: Option<&'static str>,
}

impl Effects {
    fn pin(&mut self, why: &'static str) {
        self.pins = self.pins.or(Some(why));
    }
}

impl Visitor for Effects {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        match stmt {
            // SET SESSION CHARACTERISTICS AS TRANSACTION ... sets default_transaction_* settings
            Statement::Set(Set::SetTransaction { session: false, .. }) => {}
            // the session's user cannot be read back and re-applied by a non-superuser
            Statement::Set(Set::SetSessionAuthorization(_)) => self.pin("SET SESSION AUTHORIZATION"),
            Statement::Discard { object_type } => {
                self.session_state = true;
                self.discards_all |= *object_type == DiscardObject::ALL;
            }
            Statement::Set(_) | Statement::Reset(_) => self.session_state = true,
            Statement::LISTEN { .. } => self.pin("LISTEN"),
            Statement::Prepare { .. } => self.pin("SQL-level PREPARE"),
            Statement::CreateTable(t) if t.temporary => self.pin("a temporary table"),
            Statement::Declare { stmts, .. } if stmts.iter().any(|d| d.hold == Some(true)) => {
                self.pin("a WITH HOLD cursor");
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.as_ref().is_some_and(|i| i.temporary) {
            self.pin("a temporary table");
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            match bare_name(&function_name(&f.name)) {
                "set_config" => self.session_state = true,
                "pg_advisory_lock"
                | "pg_advisory_lock_shared"
                | "pg_try_advisory_lock"
                | "pg_try_advisory_lock_shared" => {
                    self.pin("a session advisory lock");
                }
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }
}

/// Effects of a statement sqlparser cannot parse, read from its shape's first words.
fn unparsed_effects(sql: &str) -> (bool, Option<&'static str>) {
    let mut shape = Vec::new();
    super::shape::shape_into(sql.as_bytes(), &mut shape);
    let text = String::from_utf8_lossy(&shape);
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    let session_state = matches!(words.first(), Some(&("set" | "reset" | "discard"))) || text.contains("set_config(");
    let pins = match words.as_slice() {
        ["listen", ..] => Some("LISTEN"),
        ["set", "session", "authorization"] => Some("SET SESSION AUTHORIZATION"),
        ["prepare", w, ..] if *w != "transaction" => Some("SQL-level PREPARE"),
        ["create", "temp" | "temporary", ..] | ["create", "local" | "global", "temp" | "temporary"] => {
            Some("a temporary table")
        }
        ["declare", ..] if text.contains(" with hold ") => Some("a WITH HOLD cursor"),
        _ if text.contains("pg_advisory_lock(") || text.contains("pg_try_advisory_lock(") => {
            Some("a session advisory lock")
        }
        _ => None,
    };
    (session_state, pins)
}

#[derive(Default)]
struct Finder {
    depth: usize,
    write: Option<String>,
    functions: Vec<String>,
}

impl Finder {
    fn write(&mut self, reason: impl Into<String>) {
        if self.write.is_none() {
            self.write = Some(reason.into());
        }
    }

    fn call(&mut self, name: &ObjectName) {
        let name = function_name(name);
        if builtin_writer(bare_name(&name)) {
            self.write(format!("calls {name}(), which writes, holds session state or needs the primary"));
        } else {
            self.functions.push(name);
        }
    }
}

impl Visitor for Finder {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        if self.depth > 1
            && matches!(stmt, Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_))
        {
            self.write("a data-modifying statement inside the query (WITH ... INSERT/UPDATE/DELETE)");
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &Statement) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.write("a locking clause (FOR UPDATE / FOR SHARE)");
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            self.write("SELECT INTO creates a table");
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            self.call(&f.name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { name, args: Some(_), .. } | TableFactor::Function { name, .. } => self.call(name),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// `schema.func` as PostgreSQL resolves it: unquoted parts lower-cased.
fn function_name(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part.as_ident() {
            Some(id) if id.quote_style.is_some() => id.value.clone(),
            Some(id) => id.value.to_lowercase(),
            None => part.to_string().to_lowercase(),
        })
        .collect();
    parts.join(".")
}

/// Transaction-control statements sqlparser cannot parse (`BEGIN ... DEFERRABLE`, `START
/// TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE`), read by hand.
fn transaction_fallback(sql: &str) -> Option<Classification> {
    // the shape drops comments and lower-cases words
    let mut shape = Vec::new();
    super::shape::shape_into(sql.as_bytes(), &mut shape);
    let text = String::from_utf8_lossy(&shape);
    let text = text.trim().trim_end_matches(';');
    let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
    let (tag, modes) = match words.as_slice() {
        ["begin", "work" | "transaction", rest @ ..] | ["begin", rest @ ..] => ("BEGIN", rest),
        ["start", "transaction", rest @ ..] => ("START TRANSACTION", rest),
        ["set", "transaction", rest @ ..] => ("SET", rest),
        _ => return None,
    };
    let mut found = TxModes::default();
    let mut i = 0;
    while i < modes.len() {
        match &modes[i..] {
            ["isolation", "level", "serializable", ..] => {
                found.serializable = Some(true);
                i += 3;
            }
            ["isolation", "level", "repeatable" | "read", _, ..] => {
                found.serializable = Some(false);
                i += 4;
            }
            ["read", "only", ..] => {
                found.read_only = Some(true);
                i += 2;
            }
            ["read", "write", ..] => {
                found.read_only = Some(false);
                i += 2;
            }
            ["not", "deferrable", ..] => i += 2,
            ["deferrable", ..] => i += 1,
            _ => return None,
        }
    }
    let tx =
        if tag == "SET" { TxControl::SetTransaction { modes: found } } else { TxControl::Begin { modes: found, tag } };
    Some(Classification { access: Access::Read, tx: Some(tx), ..Classification::write("") })
}

#[cfg(test)]
mod tests;
