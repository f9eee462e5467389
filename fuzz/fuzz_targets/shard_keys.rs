//! Shard-key extraction and placement: an arbitrary statement, classified, routed on a
//! database with hash, list and range sharded tables, with arbitrary Bind parameters; and a
//! COPY row splitter fed arbitrary data.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgrouter::config::Config;
use pgrouter::router::Router;
use pgrouter::router::copy::{CopyFormat, RowSplitter};
use pgrouter::router::shape::Shape;
use pgrouter::router::sharded::{BindParams, ShardMap, Values};

const CONFIG: &str = r#"
[[users]]
name = "app"
password = "x"
[[databases]]
name = "shop"
[[databases.shards]]
primary = "127.0.0.1:1"
[[databases.shards]]
primary = "127.0.0.1:2"
[[databases.sharded_tables]]
table = "orders"
column = "customer_id"
type = "bigint"
[[databases.sharded_tables]]
table = "users"
column = "id"
type = "uuid"
[[databases.sharded_tables]]
table = "regions"
column = "code"
type = "text"
scheme = "list"
values = [{ shard = 0, values = ["us"] }, { shard = 1, values = ["eu"] }]
[[databases.sharded_tables]]
table = "events"
column = "day"
type = "integer"
scheme = "range"
ranges = [{ shard = 0, to = 100 }, { shard = 1, from = 100 }]
"#;

fn map() -> &'static ShardMap {
    static MAP: OnceLock<ShardMap> = OnceLock::new();
    MAP.get_or_init(|| ShardMap::new(&Config::from_toml(CONFIG).expect("valid").databases[0]))
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (sql, bind) = data.split_at(split);
    let router = Router::new(16);
    let mut shape = Shape::default();
    let class = router.classify(sql, &mut shape);
    let params = BindParams::parse(bind.get(1..).unwrap_or_default());
    let values = Values { sql, literals: &shape.literals, params };
    let _ = map().route(&class.tables, &values);
    for csv in [false, true] {
        let format = CopyFormat {
            csv,
            delimiter: if csv { b',' } else { b'\t' },
            quote: b'"',
            escape: b'"',
            null: b"\\N".to_vec(),
        };
        let mut splitter = RowSplitter::new(format);
        splitter.feed(bind);
        let rows: Vec<Vec<u8>> = splitter.rows().map(<[u8]>::to_vec).collect();
        for row in rows.iter().chain(std::iter::once(&splitter.rest().to_vec())) {
            for index in 0..3 {
                let _ = splitter.field(row, index);
            }
        }
    }
});
