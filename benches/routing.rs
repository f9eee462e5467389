//! Classification cost: a shape-cache hit (shape computation included) against a full
//! sqlparser parse, for the kind of statements ORMs send, and the shape moved over from the
//! same statement with other literals. DESIGN §4 targets a hit under 1 µs.
//! Also shard placement: a key read from its text and hashed as PostgreSQL hashes it.
//!
//! Run with `cargo bench --bench routing`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgrouter::config::{KeyType, Scheme, ShardedTable};
use pgrouter::router::Router;
use pgrouter::router::classify::classify;
use pgrouter::router::shape::Shape;
use pgrouter::sharding::Placement;

const STATEMENTS: &[(&str, &str)] = &[
    (
        "sqlalchemy select by pk",
        "SELECT users.id AS users_id, users.name AS users_name, users.email AS users_email, users.created_at AS users_created_at FROM users WHERE users.id = 42",
    ),
    (
        "django filtered list",
        "SELECT \"shop_order\".\"id\", \"shop_order\".\"customer_id\", \"shop_order\".\"total\", \"shop_order\".\"status\", \"shop_order\".\"created_at\" FROM \"shop_order\" INNER JOIN \"shop_customer\" ON (\"shop_order\".\"customer_id\" = \"shop_customer\".\"id\") WHERE (\"shop_customer\".\"country\" = 'DE' AND \"shop_order\".\"created_at\" >= '2024-01-01T00:00:00+00:00'::timestamptz AND \"shop_order\".\"status\" IN ('paid', 'shipped')) ORDER BY \"shop_order\".\"created_at\" DESC LIMIT 21",
    ),
    (
        "django insert returning",
        "INSERT INTO \"shop_order\" (\"customer_id\", \"total\", \"status\", \"created_at\") VALUES (17, 99.50, 'new', '2024-05-01T10:00:00+00:00'::timestamptz) RETURNING \"shop_order\".\"id\"",
    ),
    ("pgbench select", "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
];

fn classification(c: &mut Criterion) {
    let router = Router::new(1024);
    let mut scratch = Shape::default();
    for (_, sql) in STATEMENTS {
        router.classify(sql.as_bytes(), &mut scratch);
    }
    let mut group = c.benchmark_group("classify");
    for (name, sql) in STATEMENTS {
        group.bench_function(format!("cache hit: {name}"), |b| {
            b.iter(|| black_box(router.classify(black_box(sql.as_bytes()), &mut scratch)));
        });
        group.bench_function(format!("shape only: {name}"), |b| {
            b.iter(|| scratch.of(black_box(sql.as_bytes())));
        });
        group.bench_function(format!("full parse: {name}"), |b| b.iter(|| black_box(classify(black_box(sql), &[]))));
        // the same statement with other numbers: the shape of one moved over to the other
        // (`Shape::relit`, what a session does for a statement of its previous one's shape)
        let other: String =
            sql.chars().map(|c| c.to_digit(10).map_or(c, |d| char::from_digit((d + 1) % 10, 10).unwrap())).collect();
        let texts = [sql.as_bytes(), other.as_bytes()];
        let mut moved = Shape::default();
        moved.of(texts[0]);
        assert!(moved.relit(texts[0], texts[1]) && moved.relit(texts[1], texts[0]), "{name}");
        let mut at = 0;
        group.bench_function(format!("shape moved over: {name}"), |b| {
            b.iter(|| {
                assert!(moved.relit(texts[at], black_box(texts[1 - at])));
                at = 1 - at;
            });
        });
    }
    group.finish();
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement");
    for (key_type, key) in [
        (KeyType::Bigint, "48213"),
        (KeyType::Text, "customer-48213"),
        (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ] {
        let table = ShardedTable {
            table: "orders".into(),
            column: "customer_id".into(),
            key_type,
            scheme: Scheme::Hash,
            ranges: Vec::new(),
            lists: Vec::new(),
        };
        let placement = Placement::new(&table, 4).unwrap();
        group.bench_function(format!("hash {key_type:?} key of 4 shards"), |b| {
            b.iter(|| placement.shard(&placement.key_from_text(black_box(key)).unwrap()).unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, classification, placement);
criterion_main!(benches);
