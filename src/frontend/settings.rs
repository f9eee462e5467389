//! Session settings under pooling: what a client set (startup parameters, SET, RESET,
//! set_config) follows it to every server connection it borrows, and nothing of it stays
//! behind for the next client.
//!
//! The proxy does not interpret SET statements. After a request that may change settings it
//! asks the server which settings the session has changed (`pg_settings.source = 'session'`),
//! which gets every subtlety right for free: SET LOCAL, SET inside a rolled-back
//! transaction, RESET ALL, DISCARD ALL. Before lending a connection it applies the difference
//! between the client's settings and the connection's with `set_config` and `RESET`.

use crate::backend::conn::Settings;
use crate::error::Error;
use crate::router::policy::quote_literal;

/// Reads back the settings a session has changed from their defaults: what `pg_settings`
/// shows as set by the session, plus two kinds it hides: `role` (SET ROLE) and custom
/// settings such as `myapp.tenant`, which are asked for by name (`custom`: the names the
/// client or the connection is known to use). A custom setting that is empty counts as unset.
#[must_use]
pub fn capture_sql<'a>(custom: impl IntoIterator<Item = &'a str>) -> String {
    let mut sql = String::from(
        "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session' \
         UNION ALL SELECT 'role', current_setting('role') WHERE current_setting('role') <> 'none'",
    );
    let names: Vec<String> = custom.into_iter().filter(|n| n.contains('.')).map(quote_literal).collect();
    if !names.is_empty() {
        sql.push_str(&format!(
            " UNION ALL SELECT n, v FROM (SELECT n, current_setting(n, true) AS v FROM unnest(ARRAY[{}]::text[]) AS n) AS c WHERE v <> ''",
            names.join(", ")
        ));
    }
    sql
}

/// At most this many custom setting names are taken from one request's text.
const MAX_CUSTOM_NAMES: usize = 64;

/// Names in `sql` that may be custom settings (`a.b`, bare, double- or single-quoted),
/// lower-cased, added to `names`. Catching a column reference too does no harm: asking for a
/// setting that does not exist gives NULL.
pub fn custom_names(sql: &[u8], names: &mut std::collections::BTreeSet<String>) {
    let text = String::from_utf8_lossy(sql).to_ascii_lowercase();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    for token in text.split(|c: char| !(word(c) || c == '.')) {
        let mut parts = token.split('.');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else { continue };
        let starts_well = |p: &str| p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if starts_well(a) && starts_well(b) && b.chars().all(word) && names.len() < MAX_CUSTOM_NAMES {
            names.insert(token.to_owned());
        }
    }
}

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// The settings a client asks for in its startup packet: every parameter that names a
/// setting, plus `-c name=value` (and `--name=value`) pairs in `options`.
pub fn from_startup(params: &[(String, String)]) -> Result<Settings, Error> {
    let mut settings = Settings::new();
    for (name, value) in params {
        let name = name.to_ascii_lowercase();
        if name == "options" {
            parse_options(value, &mut settings)?;
        } else if !NOT_SETTINGS.contains(&name.as_str()) {
            settings.insert(name, value.clone());
        }
    }
    Ok(settings)
}

/// `options` as libpq sends it: command-line switches separated by spaces, with `\ ` for a
/// space inside a value. Only `-c name=value` and `--name=value` set anything.
fn parse_options(options: &str, settings: &mut Settings) -> Result<(), Error> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let pair = match w.as_str() {
            "-c" => words.next(),
            _ if w.starts_with("--") => Some(w[2..].to_owned()),
            _ if w.starts_with("-c") => Some(w[2..].to_owned()),
            _ => {
                return Err(Error::NotSupported(format!(
                    "unsupported startup option \"{w}\": pgrouter understands -c name=value"
                )));
            }
        };
        let pair = pair.unwrap_or_default();
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("invalid startup option \"{pair}\": expected name=value")))?;
        settings.insert(name.to_ascii_lowercase().replace('-', "_"), value.to_owned());
    }
    Ok(())
}

/// The statement that turns a connection's settings `current` into `desired`, if they differ.
#[must_use]
pub fn apply_sql(desired: &Settings, current: &Settings) -> Option<String> {
    // the usual case, checked once per request: one walk of both maps, nothing allocated
    if desired == current {
        return None;
    }
    let sets: Vec<String> = desired
        .iter()
        .filter(|(name, value)| current.get(*name) != Some(*value))
        .map(|(name, value)| format!("set_config({}, {}, false)", quote_literal(name), quote_literal(value)))
        .collect();
    let resets: Vec<String> = current
        .keys()
        .filter(|name| !desired.contains_key(*name))
        .map(|name| format!("RESET {}", name.split('.').map(quote_ident).collect::<Vec<_>>().join(".")))
        .collect();
    // the SELECT last: a statement_timeout it sets applies only to later statements
    let mut statements = resets;
    if !sets.is_empty() {
        statements.push(format!("SELECT {}", sets.join(", ")));
    }
    (!statements.is_empty()).then(|| statements.join("; "))
}

/// Whether the connection's settings `current` carry a statement_timeout: the statement that
/// applies other settings then runs under it.
#[must_use]
pub fn times_out(current: &Settings) -> bool {
    current.contains_key("statement_timeout")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Settings from the rows of [`capture_sql`].
#[must_use]
pub fn from_rows(rows: Vec<Vec<Option<String>>>) -> Settings {
    rows.into_iter()
        .filter_map(|row| {
            let mut it = row.into_iter();
            Some((it.next()??, it.next()?.unwrap_or_default()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn startup_parameters_and_options() {
        let params: Vec<(String, String)> = [
            ("user", "app"),
            ("database", "app"),
            ("application_name", "psql"),
            ("DateStyle", "ISO"),
            ("options", "-c search_path=s1,\\ public --statement-timeout=5s -clock_timeout=1s"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let s = from_startup(&params).unwrap();
        let expected = settings(&[
            ("application_name", "psql"),
            ("datestyle", "ISO"),
            ("lock_timeout", "1s"),
            ("search_path", "s1, public"),
            ("statement_timeout", "5s"),
        ]);
        assert_eq!(s, expected);
        assert!(from_startup(&[("options".into(), "-X".into())]).is_err());
    }

    #[test]
    fn custom_setting_names_are_found_in_any_spelling() {
        let mut names = std::collections::BTreeSet::new();
        custom_names(b"SET MyApp.Tenant = 'a'; select set_config('app.user_id', $1, false), t.col from t", &mut names);
        custom_names(b"reset \"x.y\"; select 1.5, a.b.c, 3.x", &mut names);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(names, ["app.user_id", "myapp.tenant", "t.col", "x.y"]);
        let sql = capture_sql(names.iter().copied().chain(["search_path"]));
        assert!(sql.contains("unnest(ARRAY[E'app.user_id', E'myapp.tenant', E't.col', E'x.y']::text[])"), "{sql}");
        assert!(!capture_sql([]).contains("unnest"));
    }

    #[test]
    fn applies_only_the_difference() {
        let desired = settings(&[("search_path", "s1, public"), ("timezone", "UTC")]);
        let current = settings(&[("timezone", "UTC"), ("work_mem", "8MB"), ("my.knob", "x")]);
        assert_eq!(
            apply_sql(&desired, &current).unwrap(),
            "RESET \"my\".\"knob\"; RESET \"work_mem\"; SELECT set_config(E'search_path', E's1, public', false)"
        );
        assert_eq!(apply_sql(&desired, &desired), None);
    }
}
