//! Sharding against real PostgreSQL: pgrouter's `hash` scheme places every key where
//! PostgreSQL's own `PARTITION BY HASH` does.

use pgrouter::config::{KeyType, Scheme, ShardedTable};
use pgrouter::sharding::Placement;

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, connect, describe, runtime};

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
