//! Sharding against real PostgreSQL: pgrouter's `hash` scheme places every key where
//! PostgreSQL's own `PARTITION BY HASH` does.

use pgrouter::config::{KeyType, Scheme, ShardedTable};
use pgrouter::sharding::Placement;

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, TextParam, connect, describe, runtime};

/// A deterministic xorshift64 stream, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bigint_keys(rng: &mut Rng) -> Vec<String> {
    let mut keys: Vec<i64> = vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX, i64::MAX - 1];
    keys.extend([i64::from(i32::MIN), i64::from(i32::MAX), 1 << 32, -(1 << 32), (1 << 32) - 1, -(1 << 31) - 1]);
    keys.extend(-500..500);
    while keys.len() < 10_000 {
        let v = rng.next() as i64;
        // full range, and values that fit 32 bits, where the high half is all 0 or all 1
        keys.push(if keys.len() % 2 == 0 { v } else { v >> 33 });
    }
    keys.iter().map(i64::to_string).collect()
}

fn integer_keys(rng: &mut Rng) -> Vec<String> {
    let mut keys: Vec<i32> = vec![i32::MIN, i32::MIN + 1, -1, 0, 1, i32::MAX, i32::MAX - 1];
    while keys.len() < 1_000 {
        keys.push(rng.next() as i32 >> (rng.next() % 31));
    }
    keys.iter().map(i32::to_string).collect()
}

fn text_keys(rng: &mut Rng) -> Vec<String> {
    let alphabet: Vec<char> = "abcXYZ019 -_'\"\\éß日本😀".chars().collect();
    let mut keys: std::collections::BTreeSet<String> = [String::new(), "a".into(), "customer-42".into()].into();
    while keys.len() < 1_000 {
        let len = (rng.next() % 41) as usize;
        keys.insert((0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize]).collect());
    }
    keys.into_iter().collect()
}

fn uuid_keys(rng: &mut Rng) -> Vec<String> {
    let mut keys =
        vec!["00000000-0000-0000-0000-000000000000".to_owned(), "ffffffff-ffff-ffff-ffff-ffffffffffff".to_owned()];
    while keys.len() < 1_000 {
        let (a, b) = (rng.next(), rng.next());
        let hex = format!("{a:016x}{b:016x}");
        keys.push(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]));
    }
    keys
}

/// 10,000 bigint, 1,000 integer, 1,000 text and 1,000 uuid keys, each placed by a real
/// PostgreSQL 15 in tables `PARTITION BY HASH` with modulus 2, 3, 4 and 7: pgrouter's shard
/// index equals the remainder of the partition PostgreSQL chose, for every key.
#[test]
fn hash_placement_matches_postgresql_partitioning() {
    let env = Env::start(EnvOptions::default());
    let url =
        format!("host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname=app", env.topo.primary.port);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let cases = [
        ("bigint", KeyType::Bigint, bigint_keys(&mut rng)),
        ("integer", KeyType::Integer, integer_keys(&mut rng)),
        ("text", KeyType::Text, text_keys(&mut rng)),
        ("uuid", KeyType::Uuid, uuid_keys(&mut rng)),
    ];
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let mut checked = 0;
        let mut mismatches = Vec::new();
        for (sql_type, key_type, keys) in &cases {
            for modulus in [2usize, 3, 4, 7] {
                let mut ddl = format!("drop table if exists p; create table p (k {sql_type}) partition by hash (k);");
                for r in 0..modulus {
                    ddl.push_str(&format!(
                        "create table p_{r} partition of p for values with (modulus {modulus}, remainder {r});"
                    ));
                }
                c.batch_execute(&ddl).await.map_err(|e| describe(&e)).unwrap();
                let insert = format!("insert into p select unnest($1::text[])::{sql_type}");
                c.execute(&insert, &[keys]).await.map_err(|e| describe(&e)).unwrap();
                let table = ShardedTable {
                    table: "p".into(),
                    column: "k".into(),
                    key_type: *key_type,
                    scheme: Scheme::Hash,
                    ranges: Vec::new(),
                    lists: Vec::new(),
                };
                let placement = Placement::new(&table, modulus).unwrap();
                let rows = c.query("select k::text, tableoid::regclass::text from p", &[]).await.unwrap();
                assert_eq!(rows.len(), keys.len(), "every {sql_type} key was stored");
                for row in rows {
                    let (key, partition): (String, String) = (row.get(0), row.get(1));
                    let theirs: usize = partition.trim_start_matches("p_").parse().unwrap();
                    let ours = placement.shard(&placement.key_from_text(&key).unwrap()).unwrap();
                    checked += 1;
                    if ours != theirs && mismatches.len() < 10 {
                        mismatches.push(format!(
                            "{sql_type} {key:?} modulus {modulus}: PostgreSQL {theirs}, pgrouter {ours}"
                        ));
                    }
                }
            }
        }
        println!("measured: {checked} (key, modulus) placements compared with PostgreSQL, {} differ", mismatches.len());
        assert!(mismatches.is_empty(), "placements differ:\n{}", mismatches.join("\n"));
        assert_eq!(checked, cases.iter().map(|c| c.2.len()).sum::<usize>() * 4);
    });
}

pub const SHOP: &str = r#"
[[databases]]
name = "shop"
server_database = "app"
pool_size = 4
[[databases.shards]]
primary = "{SHARD0}"
[[databases.shards]]
primary = "{SHARD1}"
[[databases.sharded_tables]]
table = "orders"
column = "customer_id"
type = "bigint"
[[databases.sharded_tables]]
table = "regions"
column = "code"
type = "text"
scheme = "list"
values = [{ shard = 0, values = ["us", "ca"] }, { shard = 1, values = ["eu", "uk"] }]
[[databases.sharded_tables]]
table = "events"
column = "day"
type = "integer"
scheme = "range"
ranges = [{ shard = 0, to = 20240101 }, { shard = 1, from = 20240101 }]
"#;

/// Where pgrouter places a customer of `orders` on two shards.
pub fn orders_shard(customer: i64) -> usize {
    pgrouter::sharding::hash::remainder(pgrouter::sharding::hash::int8(customer), 2)
}

/// Statements with a shard key run on the key's shard: literals, `$1` in text and binary
/// format, list and range schemes; rows are checked directly on each shard. Statements that
/// would need every shard are refused with a clear error.
#[test]
fn statements_go_to_the_shard_their_key_names() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let ddl = "set role app; create table orders (id serial, customer_id bigint not null, note text); \
               create table regions (code text primary key, name text); create table events (day int, what text)";
    for shard in &env.topo.shards {
        shard.psql("app", ddl).expect("schema on each shard");
    }
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    let rt = runtime();
    rt.block_on(async {
        let c = connect(&url).await.unwrap();
        for customer in 1..=20i64 {
            // a literal key: one statement after another of the same shape, so routing moves
            // the shape of the one before to the next (`Shape::relit`) rather than scanning it
            let sql = format!("insert into orders (customer_id, note) values ({customer}, 'literal')");
            c.simple_query(&sql).await.map_err(|e| describe(&e)).unwrap();
        }
        for customer in 1..=20i64 {
            // a binary $1 (tokio-postgres sends i64 in binary) and a text $1
            c.execute("insert into orders (customer_id, note) values ($1, 'binary')", &[&customer])
                .await
                .map_err(|e| describe(&e))
                .unwrap();
            let text = TextParam(Some(customer.to_string()));
            c.execute("insert into orders (note, customer_id) values ('text', $1)", &[&text])
                .await
                .map_err(|e| describe(&e))
                .unwrap();
        }
        for customer in 1..=20i64 {
            let rows =
                c.query("select note from orders where customer_id = $1 order by note", &[&customer]).await.unwrap();
            let notes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(notes, ["binary", "literal", "text"], "customer {customer} reads back its own rows");
        }
        let n: i64 =
            c.query_one("select count(*) from orders o where o.customer_id in (7, 7)", &[]).await.unwrap().get(0);
        assert_eq!(n, 3);
        for sql in
            ["insert into regions (code, name) values ('uk', 'United Kingdom')", "insert into regions values ('ca')"]
        {
            let result = c.simple_query(sql).await.map(|_| ()).map_err(|e| describe(&e));
            if sql.contains("(code, name)") {
                result.unwrap();
            } else {
                assert!(
                    result.is_err_and(|e| e.contains("column list")),
                    "an INSERT without its column list is refused"
                );
                c.simple_query("insert into regions (code, name) values ('ca', 'Canada')").await.unwrap();
            }
        }
        for (day, what) in [(20231231, "old"), (20240101, "new")] {
            c.execute("insert into events (day, what) values ($1, $2)", &[&day, &what])
                .await
                .map_err(|e| describe(&e))
                .unwrap();
        }
        let refused = |e: tokio_postgres::Error| describe(&e);
        let total = c.simple_query("select count(*) from orders").await.unwrap().into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(total.as_deref(), Some("60"), "count(*) over both shards");
        let keyless = c.simple_query("select avg(customer_id) from orders").await.map(|_| ()).map_err(refused);
        assert!(keyless.as_ref().is_err_and(|e| e.contains("needs every shard")), "{keyless:?}");
        let write = c.simple_query("update orders set note = 'x'").await.map(|_| ()).map_err(refused);
        assert!(write.as_ref().is_err_and(|e| e.contains("needs every shard")), "{write:?}");
        let unmapped = c.simple_query("insert into regions (code) values ('jp')").await.map(|_| ()).map_err(refused);
        assert!(unmapped.as_ref().is_err_and(|e| e.contains("'jp'")), "{unmapped:?}");
        let ok: i64 = c.query_one("select count(*) from orders where customer_id = 3", &[]).await.unwrap().get(0);
        assert_eq!(ok, 3, "the session works after refusals");
    });
    // every row is on the shard pgrouter's placement names, and nowhere else
    let mut total = 0;
    for (index, shard) in env.topo.shards.iter().enumerate() {
        let rows = shard.psql("app", "select customer_id from orders").unwrap();
        for line in rows.lines().filter(|l| !l.is_empty()) {
            let customer: i64 = line.parse().unwrap();
            assert_eq!(orders_shard(customer), index, "customer {customer} is on shard {index}");
            total += 1;
        }
        let regions = shard.psql("app", "select string_agg(code, ',' order by code) from regions").unwrap();
        assert_eq!(regions.trim(), ["ca", "uk"][index], "list scheme on shard {index}");
        let events = shard.psql("app", "select string_agg(what, ',') from events").unwrap();
        assert_eq!(events.trim(), ["old", "new"][index], "range scheme on shard {index}");
    }
    assert_eq!(total, 60, "every row landed once");
    println!(
        "measured: 60 rows by literal, binary and text keys, all on their shard; list and range schemes placed as configured"
    );
}

/// A transaction runs on one shard: a statement for another shard inside it (simple or
/// extended protocol, literal or parameter key), or one that needs every shard, fails with a
/// clear error, the transaction aborts, and nothing of it is committed on either shard.
#[test]
fn a_transaction_stays_on_one_shard() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    for shard in &env.topo.shards {
        shard.psql("app", "set role app; create table orders (customer_id bigint, note text)").unwrap();
    }
    let a = 1i64;
    let b = (2..).find(|&k| orders_shard(k) != orders_shard(a)).unwrap();
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    runtime().block_on(async {
        let mut c = connect(&url).await.unwrap();
        let err = |r: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>| {
            r.map(|_| ()).map_err(|e| describe(&e))
        };
        // simple protocol, literal keys
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!("insert into orders (customer_id, note) values ({a}, 'simple')")).await.unwrap();
        let second =
            err(c.simple_query(&format!("insert into orders (customer_id, note) values ({b}, 'simple')")).await);
        assert!(second.as_ref().is_err_and(|e| e.contains("runs on one shard")), "{second:?}");
        let after = err(c.simple_query("select 1").await);
        assert!(after.as_ref().is_err_and(|e| e.starts_with("25P02")), "the transaction is aborted: {after:?}");
        c.simple_query("commit").await.unwrap();
        // a statement that needs every shard
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!("insert into orders (customer_id, note) values ({a}, 'all')")).await.unwrap();
        let all = err(c.simple_query("select count(*) from orders").await);
        assert!(all.as_ref().is_err_and(|e| e.contains("needs every shard")), "{all:?}");
        c.simple_query("rollback").await.unwrap();
        // extended protocol, the key as a parameter
        let tx = c.transaction().await.unwrap();
        tx.execute("insert into orders (customer_id, note) values ($1, 'extended')", &[&a]).await.unwrap();
        let second = tx.execute("insert into orders (customer_id, note) values ($1, 'extended')", &[&b]).await;
        let second = second.map_err(|e| describe(&e));
        assert!(second.as_ref().is_err_and(|e| e.contains("not for shard")), "{second:?}");
        drop(tx);
        let n: i64 = c.query_one("select count(*) from orders where customer_id = $1", &[&a]).await.unwrap().get(0);
        assert_eq!(n, 0, "nothing committed through the proxy");
    });
    for shard in &env.topo.shards {
        assert_eq!(
            shard.psql("app", "select count(*) from orders").unwrap().trim(),
            "0",
            "nothing committed on any shard"
        );
    }
}

/// Statements that need every shard: DDL through pgrouter creates the table on both shards;
/// a keyless read whose rows can simply be concatenated returns every shard's rows with one
/// summed count; what cannot be merged yet is refused saying why; an error names its shard.
#[test]
fn ddl_and_plain_reads_run_on_every_shard() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    let a = 1i64;
    let b = (2..).find(|&k| orders_shard(k) != orders_shard(a)).unwrap();
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let run = |sql: String| {
            let c = &c;
            async move { c.simple_query(&sql).await.map_err(|e| describe(&e)) }
        };
        run("create table orders (customer_id bigint not null, note text)".into()).await.unwrap();
        run("create index orders_note on orders (note)".into()).await.unwrap();
        for k in [a, b, a] {
            run(format!("insert into orders (customer_id, note) values ({k}, 'n{k}')")).await.unwrap();
        }
        let rows: Vec<String> = run("select note from orders".into())
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        let mut sorted = rows.clone();
        sorted.sort();
        assert_eq!(sorted, [format!("n{a}"), format!("n{a}"), format!("n{b}")], "rows from both shards");
        let complete = run("select note from orders where note like 'n%'".into()).await.unwrap();
        let count = complete.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        assert_eq!(count, Some(3), "one CommandComplete with the summed count");
        let merged = run("select count(*) from orders group by note".into()).await;
        assert!(merged.as_ref().is_err_and(|e| e.contains("GROUP BY") && e.contains("not built yet")), "{merged:?}");
        let ordered = run("select * from orders order by note".into()).await;
        assert!(ordered.as_ref().is_err_and(|e| e.contains("ordering a column of type")), "{ordered:?}");
        let write = run("delete from orders".into()).await;
        assert!(write.as_ref().is_err_and(|e| e.contains("cross_shard_writes")), "{write:?}");
        // the extended protocol with the unnamed statement (as psycopg 3 sends DDL and reads)
        let rows = c
            .query_typed("select note from orders where note <> $1", &[(&"x", tokio_postgres::types::Type::TEXT)])
            .await;
        assert_eq!(rows.map_err(|e| describe(&e)).unwrap().len(), 3, "extended-protocol rows from both shards");
        c.query_typed("create index orders_extended on orders (customer_id)", &[])
            .await
            .map_err(|e| describe(&e))
            .unwrap();
        let named = c.query("select note from orders", &[]).await.map_err(|e| describe(&e));
        assert!(named.as_ref().is_err_and(|e| e.contains("named prepared statement")), "{named:?}");
    });
    for shard in &env.topo.shards {
        let index = shard
            .psql("app", "select count(*) from pg_indexes where indexname in ('orders_note', 'orders_extended')")
            .unwrap();
        assert_eq!(index.trim(), "2", "DDL ran on every shard, by simple and extended protocol");
    }
    // an error on one shard names it
    env.topo.shards[1].psql("app", "set role app; create index orders_key on orders (customer_id)").unwrap();
    let out = env.proxy.psql("shop", &["-c", "create index orders_key on orders (customer_id)"]);
    let err = crate::harness::stderr(&out);
    assert!(err.contains("shard 1") && err.contains("already exists"), "{err}");
}

/// count/sum/min/max without GROUP BY, and ORDER BY with LIMIT/OFFSET, over two shards give
/// what one unsharded database holding every row gives (the primary of the test topology,
/// with the same rows).
#[test]
fn aggregates_and_ordered_merges_over_every_shard_match_one_database() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let schema = "create table orders (customer_id bigint not null, amount numeric(12,2), qty int)";
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rows: Vec<String> = (0..400)
        .map(|i| {
            let amount = if i % 17 == 0 {
                "null".to_owned()
            } else {
                format!("{}.{:02}", rng.next() % 10_000, rng.next() % 100)
            };
            format!("({}, {amount}, {})", (rng.next() % 1000) as i64 - 500, (rng.next() % 50) as i64 - 10)
        })
        .collect();
    let insert = format!("insert into orders (customer_id, amount, qty) values {}", rows.join(", "));
    env.primary_sql(&format!("set role app; {schema}; {insert}"));
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    let queries = [
        "select count(*) from orders",
        "select count(amount), sum(amount), min(amount), max(amount) from orders",
        "select sum(qty), min(qty), max(qty), count(*) filter (where qty < 0) from orders",
        "select count(*), sum(amount), min(customer_id), max(customer_id) from orders where qty > 1000",
        "select max(amount) as top, min(qty) as low from orders where amount > 5000",
        // ORDER BY (k-way merge) and LIMIT/OFFSET after the merge; every column is a sort key,
        // so rows that tie look the same
        "select customer_id, qty, amount from orders order by customer_id, qty, amount",
        "select customer_id, qty, amount from orders order by amount desc nulls last, customer_id, qty limit 15 offset 10",
        "select qty, customer_id, amount from orders where amount > 100 order by 1 desc, 2, 3 limit 5",
        "select o.customer_id, o.qty, o.amount from orders o order by o.customer_id desc, qty, amount nulls first offset 390",
        "select customer_id, qty, amount from orders order by qty, customer_id, amount limit 0",
    ];
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        c.simple_query(schema).await.map_err(|e| describe(&e)).unwrap();
        // one INSERT per row, so each goes to its key's shard
        for row in &rows {
            c.simple_query(&format!("insert into orders (customer_id, amount, qty) values {row}"))
                .await
                .map_err(|e| describe(&e))
                .unwrap();
        }
        for sql in queries {
            let through = crate::harness::stdout(&env.proxy.psql("shop", &["-qAt", "-c", sql]));
            let direct = env.primary_sql(sql);
            assert_eq!(through.trim(), direct.trim(), "{sql}");
        }
        let binary = c.query_typed("select sum(qty) from orders", &[]).await.map_err(|e| describe(&e));
        assert!(binary.as_ref().is_err_and(|e| e.contains("binary format")), "{binary:?}");
        // LIMIT without ORDER BY: any rows, but as many as asked
        let some =
            crate::harness::stdout(&env.proxy.psql("shop", &["-qAt", "-c", "select customer_id from orders limit 7"]));
        assert_eq!(some.lines().count(), 7);
        let text_order =
            c.simple_query("select note from orders order by note").await.map(|_| ()).map_err(|e| describe(&e));
        assert!(text_order.is_err(), "ordering by a column whose type is not handled is refused");
    });
    let per_shard: Vec<String> =
        env.topo.shards.iter().map(|s| s.psql("app", "select count(*) from orders").unwrap()).collect();
    println!(
        "measured: {} aggregate and ORDER BY/LIMIT queries over two shards ({} rows) equal one database's answers",
        queries.len(),
        per_shard.join("+").replace('\n', "")
    );
}

/// A multi-row INSERT whose rows belong to different shards is split: each shard gets its
/// rows, the client one `INSERT 0 n` (and every RETURNING row).
#[test]
fn a_multi_row_insert_is_split_between_shards() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        c.simple_query("create table orders (customer_id bigint not null, note text)").await.unwrap();
        let values: Vec<String> = (1..=12).map(|k| format!("({k}, 'n{k}')")).collect();
        let sql = format!("insert into orders (note, customer_id) select 'x', 0 where false; insert into orders (customer_id, note) values {} returning customer_id", values.join(", "));
        let several = c.simple_query(&sql).await.map(|_| ()).map_err(|e| describe(&e));
        assert!(several.is_err(), "a split INSERT must be sent alone");
        let sql = format!("insert into orders (customer_id, note) values {} returning customer_id", values.join(", "));
        let messages = c.simple_query(&sql).await.map_err(|e| describe(&e)).unwrap();
        let returned = messages.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
        let complete = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        assert_eq!((returned, complete), (12, Some(12)));
        // with parameters, as one unnamed statement (SQLAlchemy's insertmanyvalues): binary
        // keys, then text keys; RETURNING answers in the order of the rows sent
        use tokio_postgres::types::{ToSql, Type};
        let keys: Vec<i64> = (13..=18).collect();
        let notes: Vec<String> = keys.iter().map(|k| format!("p{k}")).collect();
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::new();
        for (k, note) in keys.iter().zip(&notes) {
            params.push((k, Type::INT8));
            params.push((note, Type::TEXT));
        }
        let sql = "insert into orders (customer_id, note) values ($1, $2), ($3, $4), ($5, $6), ($7, $8), ($9, $10), ($11, $12) returning customer_id, note";
        let rows = c.query_typed(sql, &params).await.map_err(|e| describe(&e)).unwrap();
        let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let sent: Vec<(i64, String)> = keys.iter().copied().zip(notes.iter().cloned()).collect();
        assert_eq!(got, sent, "RETURNING rows in the order sent");
        let text_keys: Vec<TextParam> = (19..=22).map(|k: i64| TextParam(Some(k.to_string()))).collect();
        let params: Vec<(&(dyn ToSql + Sync), Type)> = text_keys.iter().map(|k| (k as _, Type::INT8)).collect();
        let sql = "insert into orders (note, customer_id) values ('t', $4), ('t', $3), ('t', $2), ('t', $1)";
        c.query_typed(sql, &params).await.map_err(|e| describe(&e)).unwrap();
        c.simple_query("begin").await.unwrap();
        let in_tx = c.simple_query("insert into orders (customer_id, note) values (1, 'a'), (2, 'b'), (3, 'c')").await;
        assert!(in_tx.map_err(|e| describe(&e)).is_err_and(|e| e.contains("one shard")));
        c.simple_query("rollback").await.unwrap();
    });
    let mut total = 0;
    for (index, shard) in env.topo.shards.iter().enumerate() {
        for line in shard.psql("app", "select customer_id from orders").unwrap().lines().filter(|l| !l.is_empty()) {
            assert_eq!(orders_shard(line.parse().unwrap()), index, "customer {line} is on shard {index}");
            total += 1;
        }
    }
    assert_eq!(total, 22, "every row once");
}

/// DDL on sharded tables inside a transaction (as `create_all()` and migration tools send it):
/// it runs on the transaction's shard and, at COMMIT, on every other shard; a failure on one
/// shard fails the COMMIT naming it and leaves nothing on any shard; ROLLBACK forgets it.
#[test]
fn ddl_in_a_transaction_reaches_every_shard_at_commit() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "shop");
    env.topo.shards[1].psql("app", "set role app; create table events (day integer)").unwrap();
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let simple = |sql: &'static str| {
            let c = &c;
            async move { c.simple_query(sql).await.map(|_| ()).map_err(|e| describe(&e)) }
        };
        let extended = |sql: &'static str| {
            let c = &c;
            async move { c.query_typed(sql, &[]).await.map(|_| ()).map_err(|e| describe(&e)) }
        };
        // the extended protocol throughout, COMMIT included (as pgjdbc sends it)
        extended("begin").await.unwrap();
        extended("create table orders (customer_id bigint not null, note text)").await.unwrap();
        extended("create index orders_customer on orders (customer_id)").await.unwrap();
        extended("commit").await.unwrap();
        // simple queries, after a catalog read (as SQLAlchemy's checkfirst does)
        simple("begin").await.unwrap();
        simple("select relname from pg_class where relname = 'regions'").await.unwrap();
        simple("create table regions (code text primary key)").await.unwrap();
        simple("commit").await.unwrap();
        // ROLLBACK forgets the DDL
        simple("begin").await.unwrap();
        simple("drop table regions").await.unwrap();
        simple("rollback").await.unwrap();
        // a shard that refuses the DDL fails the COMMIT, and no shard keeps it
        simple("begin").await.unwrap();
        simple("create table events (day integer)").await.unwrap();
        let commit = simple("commit").await;
        assert!(commit.as_ref().is_err_and(|e| e.contains("shard 1") && e.contains("already exists")), "{commit:?}");
        simple("select 1").await.expect("the session goes on after the failed COMMIT");
    });
    for shard in &env.topo.shards {
        let tables = shard
            .psql("app", "select string_agg(relname, ',' order by relname) from pg_class where relname in ('orders', 'orders_customer', 'regions')")
            .unwrap();
        assert_eq!(tables.trim(), "orders,orders_customer,regions", "DDL committed on every shard");
    }
    let events = env.topo.shards[0].psql("app", "select count(*) from pg_class where relname = 'events'").unwrap();
    assert_eq!(events.trim(), "0", "the failed COMMIT left nothing on shard 0");
}
