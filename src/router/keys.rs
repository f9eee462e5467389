//! What a statement says about the tables it touches, for sharding (DESIGN §5): which tables
//! it names, which columns its WHERE pins to values (`col = v`, `col IN (...)`, AND-ed), and an
//! INSERT's column list and rows. Facts about the text only — which tables are sharded is the
//! database's business — so the result lives in the shape cache with the classification.
//!
//! Values are not copied: a literal is named by its position among the text's literals (the
//! shape scan finds them again on a cache hit), a parameter by its number.

use std::collections::HashMap;

use sqlparser::ast::{
    BinaryOperator, Expr, FromTable, InTarget, ObjectName, SetExpr, Statement, TableFactor, TableObject,
    TableWithJoins, UnaryOperator, Value, visit_relations,
};
use sqlparser::tokenizer::Location;

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueRef {
    /// The n-th literal of the text (0-based), negated when written `-literal`.
    Literal {
        ordinal: usize,
        negative: bool,
    },
    /// `$n` (1-based).
    Param(usize),
    Null,
    /// Anything else (an expression, a DEFAULT): not a usable key.
    Other,
}

/// `column = value` (or `column IN (values)`) from a WHERE clause's AND-ed predicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equality {
    /// The table the column belongs to when the text says (alias resolved), else None.
    pub table: Option<String>,
    pub column: String,
    pub values: Vec<ValueRef>,
}

/// An INSERT's target and rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertRows {
    pub table: String,
    /// The column list; empty when the text has none.
    pub columns: Vec<String>,
    /// The VALUES rows; None when the rows come from a query.
    pub rows: Option<Vec<Vec<ValueRef>>>,
}

/// The sharding-relevant facts of one query text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableUse {
    /// Every table (or view, or CTE) named, normalised (see [`normalise`]).
    pub tables: Vec<String>,
    /// Predicates of the statement's own WHERE (single-statement texts only).
    pub equalities: Vec<Equality>,
    pub insert: Option<InsertRows>,
    /// CREATE/ALTER/DROP/TRUNCATE and other schema changes.
    pub ddl: bool,
    /// More than one statement: keys are not used, the text goes where its tables allow.
    pub several: bool,
    /// Why the rows of this statement run on every shard could not be combined into its
    /// result (ORDER BY, LIMIT, GROUP BY, ...); None when they can.
    pub unmergeable: Option<&'static str>,
    /// A query with ORDER BY or LIMIT/OFFSET: run on every shard, its rows need
    /// [`ordered_merge`].
    pub ordered: bool,
    /// A query whose every column is count/sum/min/max (no GROUP BY): each shard answers one
    /// row, and these say how to combine the columns. Empty: rows are concatenated.
    pub aggregates: Vec<Aggregate>,
}

pub use crate::sharding::combine::Aggregate;

/// A name as PostgreSQL resolves its case: quoted parts kept, others lower-cased, joined by
/// dots.
#[must_use]
pub fn normalise(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|part| match part.as_ident() {
            Some(id) if id.quote_style.is_some() => id.value.clone(),
            Some(id) => id.value.to_lowercase(),
            None => part.to_string().to_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Reads the facts of `statements`; `sql` is their text and `literals` the byte ranges of its
/// literals, in order, from the shape scan.
#[must_use]
pub fn table_use(statements: &[Statement], sql: &str, literals: &[(usize, usize)]) -> TableUse {
    let mut out = TableUse { several: statements.len() > 1, ..TableUse::default() };
    for stmt in statements {
        let _ = visit_relations(stmt, |name| {
            let name = normalise(name);
            if !out.tables.contains(&name) {
                out.tables.push(name);
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        // DROP's names and COPY's table are not visited as relations
        let unvisited = match stmt {
            Statement::Drop { names, .. } => names.as_slice(),
            Statement::Copy { source: sqlparser::ast::CopySource::Table { table_name, .. }, .. } => {
                std::slice::from_ref(table_name)
            }
            _ => &[],
        };
        for name in unvisited.iter().map(normalise) {
            if !out.tables.contains(&name) {
                out.tables.push(name);
            }
        }
        out.ddl |= is_ddl(stmt);
    }
    out.ordered = matches!(statements, [Statement::Query(q)] if q.order_by.is_some() || q.limit_clause.is_some());
    (out.unmergeable, out.aggregates) = match statements {
        [stmt] => match combinable_aggregates(stmt) {
            Some(aggregates) => (None, aggregates),
            None => (unmergeable(stmt), Vec::new()),
        },
        _ => (Some("several statements"), Vec::new()),
    };
    if let [stmt] = statements {
        let values = Refs { sql, literals };
        let (aliases, selection) = match stmt {
            Statement::Query(q) => match q.body.as_ref() {
                SetExpr::Select(s) => (aliases(&s.from), s.selection.as_ref()),
                _ => (HashMap::new(), None),
            },
            Statement::Update(u) => (aliases(std::slice::from_ref(&u.table)), u.selection.as_ref()),
            Statement::Delete(d) => {
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
                (aliases(from), d.selection.as_ref())
            }
            Statement::Insert(insert) => {
                out.insert = insert_rows(insert, &values);
                (HashMap::new(), None)
            }
            _ => (HashMap::new(), None),
        };
        if let Some(expr) = selection {
            conjuncts(expr, &aliases, &values, &mut out.equalities);
        }
    }
    out
}

/// A column of the result a merge sorts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortColumn {
    /// 0-based position in the result.
    Position(usize),
    /// A result column's name.
    Name(String),
}

/// One ORDER BY item, as the merge applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub column: SortColumn,
    pub descending: bool,
    pub nulls_first: bool,
}

/// How the rows of every shard become the statement's result: merged in `order`, then
/// `offset` skipped and at most `limit` kept. `sql` is what each shard runs (LIMIT raised to
/// cover the offset, OFFSET dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderedMerge {
    pub order: Vec<SortKey>,
    pub limit: Option<u64>,
    pub offset: u64,
    pub sql: String,
}

/// Plans the merge of a query with ORDER BY and/or LIMIT/OFFSET run on every shard, from the
/// text itself (positions and limits are literals, so this is not cached by shape). The sort
/// keys must be result columns, named or by position.
pub fn ordered_merge(sql: &str) -> Result<OrderedMerge, &'static str> {
    let statements = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
        .map_err(|_| "a statement pgrouter cannot parse")?;
    let [Statement::Query(query)] = statements.as_slice() else { return Err("several statements") };
    let mut query = query.clone();
    let SetExpr::Select(select) = query.body.as_ref() else { return Err("a set operation (UNION, INTERSECT, EXCEPT)") };
    let mut order = Vec::new();
    if let Some(order_by) = &query.order_by {
        let sqlparser::ast::OrderByKind::Expressions(items) = &order_by.kind else { return Err("ORDER BY ALL") };
        for item in items {
            let descending = match &item.options.sort {
                None | Some(sqlparser::ast::OrderBySort::Asc) => false,
                Some(sqlparser::ast::OrderBySort::Desc) => true,
                Some(sqlparser::ast::OrderBySort::Using(_)) => return Err("ORDER BY ... USING"),
            };
            let column = sort_column(&item.expr, &select.projection)
                .ok_or("ORDER BY an expression that is not a result column")?;
            order.push(SortKey { column, descending, nulls_first: item.options.nulls_first.unwrap_or(descending) });
        }
    }
    let literal = |e: &Expr| match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<u64>().ok(),
            _ => None,
        },
        _ => None,
    };
    let (limit, offset) = match &query.limit_clause {
        None => (None, 0),
        Some(sqlparser::ast::LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
            let limit = match limit {
                None => None,
                Some(Expr::Value(v)) if matches!(v.value, Value::Null) => None,
                Some(e) => Some(literal(e).ok_or("LIMIT that is not a number")?),
            };
            let offset = match offset {
                None => 0,
                Some(o) => literal(&o.value).ok_or("OFFSET that is not a number")?,
            };
            (limit, offset)
        }
        Some(_) => return Err("this LIMIT syntax"),
    };
    // every shard must send the rows that could end up in the first limit + offset
    query.limit_clause = limit.map(|n| sqlparser::ast::LimitClause::LimitOffset {
        limit: Some(Expr::value(Value::Number((n + offset).to_string(), false))),
        offset: None,
        limit_by: Vec::new(),
    });
    Ok(OrderedMerge { order, limit, offset, sql: Statement::Query(query).to_string() })
}

/// The result column an ORDER BY expression names: `ORDER BY 2`, a column, or an alias.
fn sort_column(expr: &Expr, projection: &[sqlparser::ast::SelectItem]) -> Option<SortColumn> {
    let norm =
        |id: &sqlparser::ast::Ident| if id.quote_style.is_some() { id.value.clone() } else { id.value.to_lowercase() };
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok().and_then(|p| p.checked_sub(1)).map(SortColumn::Position),
            _ => None,
        },
        Expr::Identifier(id) => Some(SortColumn::Name(norm(id))),
        // t.col sorts by the result column col only if the select list has it under that name
        Expr::CompoundIdentifier(parts) => {
            let col = norm(parts.last()?);
            let listed = projection.iter().any(|item| match item {
                sqlparser::ast::SelectItem::UnnamedExpr(Expr::Identifier(id)) => norm(id) == col,
                sqlparser::ast::SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => {
                    p.last().map(norm) == Some(col.clone())
                }
                sqlparser::ast::SelectItem::Wildcard(_) | sqlparser::ast::SelectItem::QualifiedWildcard(..) => true,
                _ => false,
            });
            listed.then_some(SortColumn::Name(col))
        }
        _ => None,
    }
}

/// Functions whose result depends on more than one row: across shards each shard would give
/// its own. User-defined aggregates cannot be recognised by name.
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "mode",
    "percentile_cont",
    "percentile_disc",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "xmlagg",
    "range_agg",
    "range_intersect_agg",
];

/// `SELECT count(*), sum(x), min(y), max(z) FROM ... [WHERE ...]`: every column one of
/// those aggregates (FILTER allowed, DISTINCT not), nothing that works on the combined rows.
fn combinable_aggregates(stmt: &Statement) -> Option<Vec<Aggregate>> {
    let Statement::Query(q) = stmt else { return None };
    let SetExpr::Select(select) = q.body.as_ref() else { return None };
    let plain_group = matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty());
    if q.order_by.is_some()
        || q.limit_clause.is_some()
        || q.fetch.is_some()
        || q.with.is_some()
        || select.distinct.is_some()
        || !plain_group
        || select.having.is_some()
        || select.projection.is_empty()
    {
        return None;
    }
    select
        .projection
        .iter()
        .map(|item| {
            let expr = match item {
                sqlparser::ast::SelectItem::UnnamedExpr(e)
                | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => return None,
            };
            let Expr::Function(f) = expr else { return None };
            let distinct =
                matches!(&f.args, sqlparser::ast::FunctionArguments::List(l) if l.duplicate_treatment.is_some());
            if f.over.is_some() || distinct || !f.within_group.is_empty() {
                return None;
            }
            match normalise(&f.name).as_str() {
                "count" | "pg_catalog.count" => Some(Aggregate::Count),
                "sum" | "pg_catalog.sum" => Some(Aggregate::Sum),
                "min" | "pg_catalog.min" => Some(Aggregate::Min),
                "max" | "pg_catalog.max" => Some(Aggregate::Max),
                _ => None,
            }
        })
        .collect()
}

/// Why rows from every shard, concatenated, would not be this statement's result. ORDER BY
/// and LIMIT/OFFSET are left to [`ordered_merge`], which needs the text's own values.
fn unmergeable(stmt: &Statement) -> Option<&'static str> {
    if let Statement::Copy { to, .. } = stmt {
        // COPY FROM STDIN is split by row before this matters (`routing::copy_split`)
        return Some(if *to { "COPY ... TO" } else { "COPY from a file or program" });
    }
    let Statement::Query(q) = stmt else {
        // writes report counts, which add up; DDL is the same statement everywhere
        return None;
    };
    if q.fetch.is_some() {
        return Some("FETCH FIRST");
    }
    let SetExpr::Select(select) = q.body.as_ref() else {
        return Some("a set operation (UNION, INTERSECT, EXCEPT)");
    };
    if select.distinct.is_some() {
        return Some("DISTINCT");
    }
    if !matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty())
        || select.having.is_some()
    {
        return Some("GROUP BY");
    }
    let mut why = None;
    let _ = sqlparser::ast::visit_expressions(&select.projection, |e| {
        if let Expr::Function(f) = e {
            let name = normalise(&f.name);
            let bare = name.rsplit('.').next().unwrap_or(&name);
            if f.over.is_some() {
                why = Some("a window function");
            } else if AGGREGATES.contains(&bare) {
                why = Some("an aggregate (count, sum, min, max, ...)");
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    why
}

fn is_ddl(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::CreateTable(_)
            | Statement::AlterTable(_)
            | Statement::Drop { .. }
            | Statement::CreateIndex(_)
            | Statement::Truncate(_)
            | Statement::CreateView(_)
            | Statement::AlterIndex { .. }
            | Statement::Comment { .. }
    )
}

/// Alias (or bare table name) -> table, for the relations a statement reads from.
fn aliases(from: &[TableWithJoins]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let factors = from.iter().flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
    for factor in factors {
        if let TableFactor::Table { name, alias, .. } = factor {
            let table = normalise(name);
            let bare = table.rsplit('.').next().unwrap_or(&table).to_owned();
            if let Some(alias) = alias {
                let a = if alias.name.quote_style.is_some() {
                    alias.name.value.clone()
                } else {
                    alias.name.value.to_lowercase()
                };
                map.insert(a, table.clone());
            } else {
                map.insert(bare, table.clone());
            }
            map.insert(table.clone(), table);
        }
    }
    map
}

fn insert_rows(insert: &sqlparser::ast::Insert, values: &Refs<'_>) -> Option<InsertRows> {
    let TableObject::TableName(name) = &insert.table else { return None };
    let rows = insert.source.as_ref().and_then(|q| match q.body.as_ref() {
        SetExpr::Values(v) => Some(v.rows.iter().map(|row| row.iter().map(|e| values.of(e)).collect()).collect()),
        _ => None,
    });
    Some(InsertRows { table: normalise(name), columns: insert.columns.iter().map(normalise).collect(), rows })
}

/// Collects `column = value` and `column IN (values)` from AND-ed predicates; anything under
/// an OR or NOT is not a constraint every row meets, so it is skipped.
fn conjuncts(expr: &Expr, aliases: &HashMap<String, String>, values: &Refs<'_>, out: &mut Vec<Equality>) {
    match expr {
        Expr::Nested(inner) => conjuncts(inner, aliases, values, out),
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            conjuncts(left, aliases, values, out);
            conjuncts(right, aliases, values, out);
        }
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            let pair = column(left, aliases).map(|c| (c, right)).or_else(|| column(right, aliases).map(|c| (c, left)));
            if let Some(((table, column), value)) = pair {
                let value = values.of(value);
                if value != ValueRef::Other {
                    out.push(Equality { table, column, values: vec![value] });
                }
            }
        }
        Expr::In { expr, target: InTarget::List(list), negated: false, .. } => {
            if let Some((table, column)) = column(expr, aliases) {
                let list: Vec<ValueRef> = list.iter().map(|e| values.of(e)).collect();
                if !list.is_empty() && !list.contains(&ValueRef::Other) {
                    out.push(Equality { table, column, values: list });
                }
            }
        }
        _ => {}
    }
}

/// A column reference: (its table when qualified, alias resolved; the column).
fn column(expr: &Expr, aliases: &HashMap<String, String>) -> Option<(Option<String>, String)> {
    let norm =
        |id: &sqlparser::ast::Ident| if id.quote_style.is_some() { id.value.clone() } else { id.value.to_lowercase() };
    match expr {
        Expr::Nested(inner) => column(inner, aliases),
        Expr::Identifier(id) => Some((None, norm(id))),
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let (col, qualifier) = parts.split_last()?;
            let qualifier: Vec<String> = qualifier.iter().map(norm).collect();
            let qualifier = qualifier.join(".");
            let table = aliases.get(&qualifier).cloned().unwrap_or(qualifier);
            Some((Some(table), norm(col)))
        }
        _ => None,
    }
}

/// Turns value expressions into [`ValueRef`]s, finding literals among the text's literals.
struct Refs<'a> {
    sql: &'a str,
    literals: &'a [(usize, usize)],
}

impl Refs<'_> {
    fn of(&self, expr: &Expr) -> ValueRef {
        match expr {
            Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => self.of(inner),
            Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match self.of(expr) {
                ValueRef::Literal { ordinal, negative } => ValueRef::Literal { ordinal, negative: !negative },
                _ => ValueRef::Other,
            },
            Expr::Value(v) => match &v.value {
                Value::Null => ValueRef::Null,
                Value::Placeholder(p) => {
                    p.strip_prefix('$').and_then(|n| n.parse().ok()).map_or(ValueRef::Other, ValueRef::Param)
                }
                Value::Number(..)
                | Value::SingleQuotedString(_)
                | Value::EscapedStringLiteral(_)
                | Value::DollarQuotedString(_)
                | Value::NationalStringLiteral(_) => self.literal_at(v.span.start),
                _ => ValueRef::Other,
            },
            _ => ValueRef::Other,
        }
    }

    /// The literal whose text contains `at`.
    fn literal_at(&self, at: Location) -> ValueRef {
        let Some(offset) = byte_offset(self.sql, at) else { return ValueRef::Other };
        self.literals
            .iter()
            .position(|&(start, end)| start <= offset && offset < end)
            .map_or(ValueRef::Other, |ordinal| ValueRef::Literal { ordinal, negative: false })
    }
}

/// A tokenizer location (1-based line and character column) as a byte offset.
fn byte_offset(sql: &str, at: Location) -> Option<usize> {
    let line_start = if at.line <= 1 {
        0
    } else {
        sql.match_indices('\n').nth(usize::try_from(at.line).ok()? - 2).map(|(i, _)| i + 1)?
    };
    let column = usize::try_from(at.column).ok()?.checked_sub(1)?;
    sql[line_start..].char_indices().nth(column).map(|(i, _)| line_start + i)
}

/// The value of the literal at `range` of `sql` as text (quotes and escapes undone), for key
/// parsing. None for literals that cannot be keys (bit strings).
#[must_use]
pub fn literal_text(sql: &[u8], (start, end): (usize, usize)) -> Option<String> {
    let raw = std::str::from_utf8(sql.get(start..end)?).ok()?;
    let first = raw.chars().next()?;
    if first == '\'' {
        return Some(raw.get(1..raw.len() - 1)?.replace("''", "'"));
    }
    if matches!(first, 'n' | 'N') {
        return Some(raw.get(2..raw.len() - 1)?.replace("''", "'"));
    }
    if matches!(first, 'e' | 'E') {
        return Some(unescape(raw.get(2..raw.len() - 1)?));
    }
    if first == '$' {
        let tag_end = raw[1..].find('$')? + 2;
        return Some(raw.get(tag_end..raw.len() - tag_end)?.to_owned());
    }
    if first.is_ascii_digit() || first == '.' {
        return Some(raw.replace('_', ""));
    }
    None
}

/// E'...' escapes: the common backslash forms and doubled quotes.
fn unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some(other) => out.push(other),
                None => {}
            },
            '\'' => {
                out.push('\'');
                let _ = chars.next();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
