use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::*;
use crate::router::shape::Shape;

fn facts(sql: &str) -> (TableUse, Shape) {
    let mut shape = Shape::default();
    shape.of(sql.as_bytes());
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
    (table_use(&statements, sql, &shape.literals), shape)
}

/// The equalities with literal values spelled out.
fn equalities(sql: &str) -> Vec<String> {
    let (facts, shape) = facts(sql);
    facts
        .equalities
        .iter()
        .map(|e| {
            let values: Vec<String> = e
                .values
                .iter()
                .map(|v| match v {
                    ValueRef::Literal { ordinal, negative } => {
                        let text = literal_text(sql.as_bytes(), shape.literals[*ordinal]).unwrap();
                        if *negative { format!("-{text}") } else { text }
                    }
                    ValueRef::Param(n) => format!("${n}"),
                    ValueRef::Null => "NULL".into(),
                    ValueRef::Other => "?".into(),
                })
                .collect();
            format!("{}.{}={}", e.table.as_deref().unwrap_or("_"), e.column, values.join("|"))
        })
        .collect()
}

#[test]
fn where_equalities_with_literals_params_aliases_and_schemas() {
    assert_eq!(equalities("SELECT * FROM orders WHERE customer_id = 42"), ["_.customer_id=42"]);
    assert_eq!(
        equalities("select * from orders where 42 = customer_id and status = 'x'"),
        ["_.customer_id=42", "_.status=x"]
    );
    assert_eq!(equalities("SELECT * FROM shop.orders o WHERE o.customer_id = $1"), ["shop.orders.customer_id=$1"]);
    assert_eq!(
        equalities(
            "SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id WHERE (c.id = -7) AND o.x IN (1, 2)"
        ),
        ["customers.id=-7", "orders.x=1|2"]
    );
    assert_eq!(equalities("SELECT * FROM orders WHERE customer_id = 5::bigint"), ["_.customer_id=5"]);
    assert_eq!(equalities("SELECT * FROM t WHERE k = E'it\\'s' AND j = $$dollar$$"), ["_.k=it's", "_.j=dollar"]);
    assert_eq!(equalities("SELECT * FROM t WHERE k = 'a''b' AND \"Mixed\" = 1"), ["_.k=a'b", "_.Mixed=1"]);
    // not constraints every row meets
    assert!(equalities("SELECT * FROM t WHERE k = 1 OR k = 2").is_empty());
    assert!(equalities("SELECT * FROM t WHERE NOT (k = 1)").is_empty());
    assert!(equalities("SELECT * FROM t WHERE k = j + 1").is_empty());
    assert_eq!(equalities("UPDATE orders SET total = 0 WHERE customer_id = 9"), ["_.customer_id=9"]);
    assert_eq!(equalities("DELETE FROM orders AS o WHERE o.customer_id = $2"), ["orders.customer_id=$2"]);
}

#[test]
fn literals_are_found_on_later_lines_and_after_multibyte_text() {
    let sql = "SELECT 'é😀' AS x\nFROM t\n  WHERE k = 'tail'";
    assert_eq!(equalities(sql), ["_.k=tail"]);
}

#[test]
fn tables_inserts_and_ddl() {
    let (f, shape) = facts("INSERT INTO Shop.Orders (customer_id, total) VALUES (1, 2.5), ($1, DEFAULT), (-3, NULL)");
    assert_eq!(f.tables, ["shop.orders"]);
    let insert = f.insert.unwrap();
    assert_eq!(insert.table, "shop.orders");
    assert_eq!(insert.columns, ["customer_id", "total"]);
    let rows = insert.rows.unwrap();
    assert_eq!(rows[0][0], ValueRef::Literal { ordinal: 0, negative: false });
    assert_eq!(rows[1], [ValueRef::Param(1), ValueRef::Other]);
    assert_eq!(rows[2], [ValueRef::Literal { ordinal: 2, negative: true }, ValueRef::Null]);
    assert_eq!(
        literal_text(b"INSERT INTO Shop.Orders (customer_id, total) VALUES (1, 2.5)", shape.literals[1]).unwrap(),
        "2.5"
    );
    let (f, _) = facts("INSERT INTO orders SELECT * FROM staging");
    assert_eq!(f.tables, ["orders", "staging"]);
    assert_eq!(f.insert.unwrap().rows, None);
    let (f, _) = facts("SELECT * FROM a WHERE x IN (SELECT y FROM b)");
    assert_eq!(f.tables, ["a", "b"]);
    for ddl in [
        "CREATE TABLE orders (id int)",
        "ALTER TABLE orders ADD COLUMN x int",
        "DROP TABLE orders",
        "CREATE INDEX i ON orders (x)",
        "TRUNCATE orders",
    ] {
        let (f, _) = facts(ddl);
        assert!(f.ddl, "{ddl}");
        assert!(f.tables.contains(&"orders".to_owned()), "{ddl}: {:?}", f.tables);
    }
    let (f, _) = facts("SELECT 1; SELECT * FROM orders WHERE customer_id = 1");
    assert!(f.several && f.equalities.is_empty());
}
