use super::*;
use crate::config::Config;
use crate::router::Router;
use crate::router::shape::Shape;
use crate::sharding::hash;

const CONFIG: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
[[users]]
name = "app"
password = "x"
[[databases]]
name = "shop"
[[databases.shards]]
primary = "127.0.0.1:5432"
[[databases.shards]]
primary = "127.0.0.1:5433"
[[databases.sharded_tables]]
table = "orders"
column = "customer_id"
type = "bigint"
[[databases.sharded_tables]]
table = "shop.customers"
column = "id"
type = "bigint"
[[databases.sharded_tables]]
table = "regions"
column = "code"
type = "text"
scheme = "list"
values = [{ shard = 0, values = ["us"] }, { shard = 1, values = ["eu", "uk"] }]
"#;

fn map() -> ShardMap {
    ShardMap::new(&Config::from_toml(CONFIG).unwrap().databases[0])
}

fn route_with(sql: &str, params: Option<BindParams<'_>>) -> ShardRoute {
    let router = Router::new(16);
    let mut shape = Shape::default();
    let class = router.classify(sql.as_bytes(), &mut shape);
    map().route(&class.tables, &Values { sql: sql.as_bytes(), literals: &shape.literals, params })
}

fn route(sql: &str) -> ShardRoute {
    route_with(sql, None)
}

fn shard_of(id: i64) -> usize {
    hash::remainder(hash::int8(id), 2)
}

fn one(sql: &str) -> usize {
    match route(sql) {
        ShardRoute::One { shard, .. } => shard.0,
        other => panic!("{sql}: {other:?}"),
    }
}

#[test]
fn keys_pick_the_shard() {
    for id in [1i64, 2, 3, 42, -7] {
        assert_eq!(one(&format!("SELECT * FROM orders WHERE customer_id = {id}")), shard_of(id), "{id}");
        assert_eq!(
            one(&format!("select * from public.orders o where o.customer_id = '{id}' and o.total > 3")),
            shard_of(id)
        );
        assert_eq!(one(&format!("UPDATE orders SET total = 1 WHERE customer_id = {id}")), shard_of(id));
        assert_eq!(one(&format!("insert into orders (id, customer_id) values (1, {id}), (2, {id})")), shard_of(id));
        assert_eq!(
            one(&format!("select * from shop.customers c join orders o on o.customer_id = c.id where c.id = {id}")),
            shard_of(id)
        );
    }
    assert_eq!(one("select * from regions where code = 'uk'"), 1);
    assert_eq!(one("select * from regions where code in ('eu', 'uk')"), 1);
}

#[test]
fn parameters_in_text_and_binary_format() {
    let sql = "SELECT * FROM orders WHERE customer_id = $1";
    let text = 42i64.to_string();
    let p = BindParams { formats: vec![], values: vec![Some(text.as_bytes())], types: vec![] };
    assert_eq!(
        route_with(sql, Some(p)),
        ShardRoute::One { shard: ShardId(shard_of(42)), table: "orders".into(), key: "42".into() }
    );
    let bin = 42i64.to_be_bytes();
    let p = BindParams { formats: vec![1], values: vec![Some(&bin)], types: vec![] };
    assert!(matches!(route_with(sql, Some(p)), ShardRoute::One { shard, .. } if shard.0 == shard_of(42)));
    // a Bind message body: portal "", statement "s", one binary format, one param, no result formats
    let mut body = b"\0s\0".to_vec();
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&8i32.to_be_bytes());
    body.extend_from_slice(&bin);
    body.extend_from_slice(&0i16.to_be_bytes());
    let parsed = BindParams::parse(&body).unwrap();
    assert!(matches!(route_with(sql, Some(parsed)), ShardRoute::One { shard, .. } if shard.0 == shard_of(42)));
}

#[test]
fn statements_without_a_usable_key() {
    assert_eq!(route("select 1"), ShardRoute::Any);
    assert_eq!(route("select * from unsharded where customer_id = 1"), ShardRoute::Home);
    assert!(matches!(route("select count(*) from orders"), ShardRoute::All { .. }));
    assert!(matches!(route("select * from orders where customer_id = 1 or customer_id = 2"), ShardRoute::All { .. }));
    assert!(matches!(route("select * from regions where code in ('us', 'uk')"), ShardRoute::All { .. }));
    assert_eq!(route("select * from orders where customer_id = $1"), ShardRoute::Unbound, "no Bind yet");
    assert!(matches!(route("create index on orders (total)"), ShardRoute::All { why } if why.contains("DDL")));
    let refused = |sql: &str| match route(sql) {
        ShardRoute::Refused(why) => why,
        other => panic!("{sql}: {other:?}"),
    };
    assert!(refused("insert into orders values (1, 2)").contains("column list"));
    assert!(refused("insert into orders (id) values (1)").contains("must give its shard key"));
    assert!(refused("select * from orders where customer_id = NULL").contains("NULL"));
    assert!(refused("select * from regions where code = 'jp'").contains("'jp'"));
    let (a, b) = (1..).map(|i| (i, shard_of(i))).find(|&(_, s)| s != shard_of(1)).map(|(i, _)| (1, i)).unwrap();
    assert_eq!(
        route(&format!("insert into orders (customer_id) values ({a}), ({b}), ({a})")),
        ShardRoute::Split { rows: vec![ShardId(shard_of(a)), ShardId(shard_of(b)), ShardId(shard_of(a))] }
    );
    assert!(
        refused(&format!(
            "select * from orders o join shop.customers c on true where o.customer_id = {a} and c.id = {b}"
        ))
        .contains("different shards")
    );
}
