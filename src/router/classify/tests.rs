use super::*;

/// Classifies without literal positions (these tests do not look at shard keys).
fn classify(sql: &str) -> Classification {
    super::classify(sql, &[])
}

fn is_read(sql: &str) -> bool {
    classify(sql).access == Access::Read
}

#[test]
fn reads() {
    for sql in [
        "SELECT 1",
        "select a, b from t where id = $1 order by a limit 10",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "VALUES (1), (2)",
        "SHOW search_path",
        "SHOW ALL",
        "EXPLAIN SELECT * FROM t",
        "EXPLAIN INSERT INTO t VALUES (1)",
        "EXPLAIN ANALYZE SELECT 1",
        "COPY t TO STDOUT",
        "COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)",
        "SELECT count(*), max(x), now(), lower(name) FROM t GROUP BY y",
        "SELECT * FROM generate_series(1, 10)",
        "select 1; select 2",
    ] {
        assert!(is_read(sql), "{sql}: {:?}", classify(sql));
    }
}

#[test]
fn writes() {
    for sql in [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "CREATE TABLE t (a int)",
        "DROP TABLE t",
        "TRUNCATE t",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR SHARE",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * FROM t FOR KEY SHARE",
        "SELECT nextval('s')",
        "SELECT currval('s')",
        "select setval('s', 10)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_xact_lock(1)",
        "SELECT set_config('a.b', 'c', false)",
        "SELECT pg_notify('ch', 'x')",
        "SELECT lo_create(0)",
        "SELECT txid_current()",
        "SELECT pg_current_wal_lsn()",
        "SELECT pg_terminate_backend(123)",
        "SHOW transaction_read_only",
        "SELECT * INTO newtable FROM t",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE) DELETE FROM t",
        "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1",
        "COPY t FROM STDIN",
        "SET search_path = app",
        "LISTEN ch",
        "NOTIFY ch",
        "VACUUM t",
        "VACUUM (ANALYZE) t",
        "DO $$ BEGIN END $$",
        "PREPARE TRANSACTION 'x'",
        "PREPARE q AS SELECT 1",
        "DISCARD ALL",
        "LOCK TABLE t",
        "this is not sql",
        "select 1; insert into t values (1)",
        // sqlparser 0.64 cannot parse these: failing closed sends them to the primary
        "TABLE t",
        "SELECT (SELECT nextval('s'))",
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)",
    ] {
        assert!(!is_read(sql), "{sql}: {:?}", classify(sql));
    }
}

#[test]
fn explain_without_analyze_option_is_read() {
    assert!(is_read("EXPLAIN (ANALYZE false) DELETE FROM t"));
    assert!(is_read("EXPLAIN (COSTS off) DELETE FROM t"));
    assert!(!classify("EXPLAIN (ANALYZE off) SELECT 1").cacheable);
}

/// (runs on a standby, tag) of a BEGIN, or (runs on a standby, "SET") of a SET TRANSACTION.
fn tx_start(sql: &str) -> Option<(bool, &'static str)> {
    match classify(sql).tx? {
        TxControl::Begin { modes, tag } => Some((modes.on_standby(), tag)),
        TxControl::SetTransaction { modes } => Some((modes.on_standby(), "SET")),
        _ => None,
    }
}

#[test]
fn transaction_control() {
    let tx = |sql: &str| classify(sql).tx;
    assert_eq!(tx_start("BEGIN"), Some((false, "BEGIN")));
    assert_eq!(tx_start("begin read only"), Some((true, "BEGIN")));
    assert_eq!(tx_start("START TRANSACTION READ ONLY"), Some((true, "START TRANSACTION")));
    assert_eq!(tx_start("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE"), Some((true, "BEGIN")));
    // a hot standby refuses SERIALIZABLE: such transactions go to the primary
    assert_eq!(tx_start("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE"), Some((false, "BEGIN")));
    assert_eq!(
        tx_start("START TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY"),
        Some((false, "START TRANSACTION"))
    );
    assert_eq!(tx_start("START TRANSACTION ISOLATION LEVEL REPEATABLE READ"), Some((false, "START TRANSACTION")));
    assert_eq!(tx_start("SET TRANSACTION READ ONLY"), Some((true, "SET")));
    assert_eq!(tx_start("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"), Some((false, "SET")));
    assert_eq!(tx_start("-- note\nbegin read only deferrable;"), Some((true, "BEGIN")));
    assert_eq!(tx_start("BEGIN deferrable nonsense"), None);
    // SET TRANSACTION only changes what it mentions
    let Some(TxControl::Begin { modes: serializable, .. }) = tx("BEGIN ISOLATION LEVEL SERIALIZABLE") else { panic!() };
    let Some(TxControl::SetTransaction { modes: ro }) = tx("SET TRANSACTION READ ONLY") else { panic!() };
    assert!(!serializable.then(ro).on_standby());
    assert_eq!(tx("COMMIT"), Some(TxControl::End { tag: "COMMIT", chain: false }));
    assert_eq!(tx("END"), Some(TxControl::End { tag: "COMMIT", chain: false }));
    assert_eq!(tx("COMMIT AND CHAIN"), Some(TxControl::End { tag: "COMMIT", chain: true }));
    assert_eq!(tx("ROLLBACK"), Some(TxControl::End { tag: "ROLLBACK", chain: false }));
    assert_eq!(tx("ABORT"), Some(TxControl::End { tag: "ROLLBACK", chain: false }));
    assert_eq!(tx("SAVEPOINT a"), Some(TxControl::Savepoint));
    assert_eq!(tx("ROLLBACK TO SAVEPOINT a"), Some(TxControl::Savepoint));
    let c = classify("BEGIN; SELECT 1; COMMIT");
    assert!(c.opens_write_transaction && c.tx.is_none(), "{c:?}");
    assert!(!classify("BEGIN READ ONLY; SELECT 1; COMMIT").opens_write_transaction);
}

#[test]
fn user_functions_are_reported() {
    let c = classify("SELECT app.price_of(id), \"MixedCase\"(1), coalesce(a, b) FROM t, my_srf(2) s");
    assert_eq!(c.access, Access::Read);
    assert_eq!(c.functions, vec!["MixedCase", "app.price_of", "coalesce", "my_srf"]);
}

#[test]
fn session_effects() {
    for sql in [
        "SET search_path = s1",
        "set session timezone to 'UTC'",
        "RESET ALL",
        "RESET work_mem",
        "DISCARD ALL",
        "SELECT set_config('search_path', 's1', false)",
        "insert into t select 1 from (select set_config('a.b', 'c', false)) x",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET ROLE other",
    ] {
        assert!(classify(sql).session_state, "{sql}");
    }
    for sql in ["SELECT 1", "SET TRANSACTION READ ONLY", "BEGIN", "SHOW search_path"] {
        assert!(!classify(sql).session_state, "{sql}");
    }
    for (sql, why) in [
        ("LISTEN ch", "LISTEN"),
        ("SELECT pg_advisory_lock(1)", "a session advisory lock"),
        ("select pg_try_advisory_lock(1, 2)", "a session advisory lock"),
        ("CREATE TEMP TABLE x (a int)", "a temporary table"),
        ("CREATE TEMPORARY TABLE x AS SELECT 1", "a temporary table"),
        ("SELECT 1 INTO TEMP x", "a temporary table"),
        ("PREPARE q AS SELECT 1", "SQL-level PREPARE"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "a WITH HOLD cursor"),
        ("SET SESSION AUTHORIZATION other", "SET SESSION AUTHORIZATION"),
    ] {
        assert_eq!(classify(sql).pins, Some(why), "{sql}");
    }
    for sql in [
        "SELECT pg_advisory_xact_lock(1)",
        "UNLISTEN ch",
        "NOTIFY ch",
        "DECLARE c CURSOR FOR SELECT 1",
        "PREPARE TRANSACTION 'x'",
        "CREATE TABLE t (a int)",
        "SET ROLE other",
    ] {
        assert_eq!(classify(sql).pins, None, "{sql}");
    }
}
