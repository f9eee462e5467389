//! COPY FROM STDIN into a sharded table through pgrouter (DESIGN §5): psql's `\copy` in text
//! and CSV format, its rows split between two shards by their key, checked directly on each
//! shard; a COPY that fails anywhere leaves nothing on any shard.

use crate::harness::{Env, EnvOptions, assert_ok, stderr, stdout};
use crate::sharding::{SHOP, orders_shard};

/// Rows per shard of orders, and whether each row is on the shard its key hashes to.
fn rows_per_shard(env: &Env) -> [usize; 2] {
    let mut counts = [0, 0];
    for (index, shard) in env.topo.shards.iter().enumerate() {
        for key in shard.psql("app", "select customer_id from orders").unwrap().lines().filter(|l| !l.is_empty()) {
            assert_eq!(orders_shard(key.parse().unwrap()), index, "customer {key} is on shard {index}");
            counts[index] += 1;
        }
    }
    counts
}

#[test]
fn copy_from_stdin_is_split_row_by_row() {
    let env = Env::start(EnvOptions { shards: 2, databases: SHOP.into(), ..EnvOptions::default() });
    let dir = tempfile::tempdir().unwrap();
    let out = env.proxy.psql("shop", &["-c", "create table orders (customer_id bigint not null, note text)"]);
    assert_ok(&out, "create table");
    // text format, no column list (the key's place comes from the catalog), escapes
    let text: String = (1..=3000i64).map(|k| format!("{k}\tnote {k}\\twith tab\\nand newline\\\\\n")).collect();
    let text_file = dir.path().join("orders.txt");
    std::fs::write(&text_file, text).unwrap();
    let out = env.proxy.psql("shop", &["-c", &format!("\\copy orders from '{}'", text_file.display())]);
    assert_ok(&out, "text COPY");
    assert!(stdout(&out).contains("COPY 3000"), "{}", stdout(&out));
    // CSV with a header, the key second, quoted fields with delimiters, quotes and newlines
    let mut csv = String::from("note,customer_id\r\n");
    for k in 3001..=5000i64 {
        csv.push_str(&format!("\"csv, \"\"{k}\"\"\nsecond line\",{k}\r\n"));
    }
    let csv_file = dir.path().join("orders.csv");
    std::fs::write(&csv_file, csv).unwrap();
    let copy = format!("\\copy orders (note, customer_id) from '{}' with (format csv, header)", csv_file.display());
    let out = env.proxy.psql("shop", &["-c", &copy]);
    assert_ok(&out, "CSV COPY");
    assert!(stdout(&out).contains("COPY 2000"), "{}", stdout(&out));
    let counts = rows_per_shard(&env);
    let expected = (1..=5000i64).fold([0, 0], |mut c, k| {
        c[orders_shard(k)] += 1;
        c
    });
    assert_eq!(counts, expected, "rows per shard");
    println!("copy: 5,000 rows split {counts:?} (text 3,000, CSV 2,000)");
    // values arrive intact
    let shard = &env.topo.shards[orders_shard(7)];
    let note =
        shard.psql("app", "select note = E'note 7\\twith tab\\nand newline\\\\' from orders where customer_id = 7");
    assert_eq!(note.unwrap().trim(), "t", "the text row's escapes decode as in one database");
    let shard = &env.topo.shards[orders_shard(4242)];
    let note = shard.psql("app", "select note = E'csv, \"4242\"\\nsecond line' from orders where customer_id = 4242");
    assert_eq!(note.unwrap().trim(), "t", "the CSV row's quoting decodes as in one database");
    // failures leave nothing anywhere: a NULL key (refused by the proxy), a row one shard refuses
    let null_key = dir.path().join("null.csv");
    std::fs::write(&null_key, "6001,a\n,b\n6002,c\n").unwrap();
    let out =
        env.proxy.psql("shop", &["-c", &format!("\\copy orders from '{}' with (format csv)", null_key.display())]);
    assert!(stderr(&out).contains("shard key customer_id is NULL"), "{}", stderr(&out));
    let bad_row = dir.path().join("bad.txt");
    let rows: String = (6001..=6100i64).map(|k| format!("{k}\tfine\n")).collect::<String>() + "6101\ttoo\tmany\n";
    std::fs::write(&bad_row, rows).unwrap();
    let out = env.proxy.psql("shop", &["-c", &format!("\\copy orders from '{}'", bad_row.display())]);
    let err = stderr(&out);
    assert!(err.contains("shard ") && err.contains("extra data after last expected column"), "{err}");
    assert_eq!(rows_per_shard(&env), expected, "the failed COPYs left no rows on any shard");
    // and the session works after them
    let out = env.proxy.psql("shop", &["-At", "-c", "select count(*) from orders"]);
    assert_eq!(stdout(&out).trim(), "5000");
    // COPY TO from every shard is refused, not answered with one shard's rows
    let out = env.proxy.psql("shop", &["-c", "copy orders to stdout"]);
    assert!(stderr(&out).contains("COPY ... TO") && stdout(&out).is_empty(), "{}", stderr(&out));
}
