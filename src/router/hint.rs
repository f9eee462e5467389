//! Routing hints a client can give: a leading comment `/* pgrouter: route=primary */`
//! (also `shard=N` and `shard_key=V`, used by sharding), and the session commands
//! `SET pgrouter.route = 'primary' | 'replica' | 'default'`, `RESET pgrouter.route` and
//! `SHOW pgrouter.route`, which pgrouter answers itself and never forwards.

/// Where a hint sends a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteHint {
    Primary,
    Replica,
}

impl RouteHint {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "primary" => Some(Self::Primary),
            "replica" => Some(Self::Replica),
            _ => None,
        }
    }
}

/// Hints found in a statement's leading comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    pub route: Option<RouteHint>,
    pub shard: Option<usize>,
    pub shard_key: Option<String>,
}

impl Hints {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.route.is_none() && self.shard.is_none() && self.shard_key.is_none()
    }
}

/// Reads `pgrouter:` hints from the comments before the first token. A malformed hint is an
/// error (a hint silently ignored would be a silent misroute).
pub fn parse_hints(sql: &[u8]) -> Result<Hints, String> {
    let mut hints = Hints::default();
    if !matches!(sql.trim_ascii_start().first(), Some(b'/' | b'-')) {
        // no comment first: the usual case, settled by one byte
        return Ok(hints);
    }
    let (comments, _) = leading_comments(sql);
    for body in comments {
        let text = String::from_utf8_lossy(body);
        if let Some(spec) = text.trim().strip_prefix("pgrouter:") {
            apply(spec, &mut hints)?;
        }
    }
    Ok(hints)
}

/// The bodies of the comments before the first token, and the text after them. A `--`
/// comment ends at a newline or carriage return, as in PostgreSQL's lexer.
fn leading_comments(sql: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut comments = Vec::new();
    let mut rest = sql;
    loop {
        rest = trim_start(rest);
        if let Some(r) = rest.strip_prefix(b"/*") {
            let Some(end) = r.windows(2).position(|w| w == b"*/") else {
                return (comments, rest);
            };
            comments.push(&r[..end]);
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix(b"--") {
            let end = r.iter().position(|&c| c == b'\n' || c == b'\r').unwrap_or(r.len());
            comments.push(&r[..end]);
            rest = &r[end..];
        } else {
            return (comments, rest);
        }
    }
}

fn apply(spec: &str, hints: &mut Hints) -> Result<(), String> {
    for item in spec.split([' ', ',', '\t', '\n']).filter(|s| !s.is_empty()) {
        let (key, value) =
            item.split_once('=').ok_or_else(|| format!("invalid pgrouter hint \"{item}\": expected key=value"))?;
        let value = value.trim_matches(|c| c == '\'' || c == '"');
        match key.to_ascii_lowercase().as_str() {
            "route" => {
                hints.route = Some(
                    RouteHint::parse(value)
                        .ok_or_else(|| format!("invalid pgrouter hint route={value}: expected primary or replica"))?,
                );
            }
            "shard" => {
                hints.shard = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid pgrouter hint shard={value}: expected a shard index"))?,
                );
            }
            "shard_key" => hints.shard_key = Some(value.to_owned()),
            other => {
                return Err(format!("unknown pgrouter hint \"{other}\" (known: route, shard, shard_key)"));
            }
        }
    }
    Ok(())
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let Some((c, rest)) = s.split_first() {
        if !c.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    s
}

/// The statement's first word (letters only, after leading whitespace): what the cheap
/// checks made on every statement look at before anything else.
#[must_use]
pub fn first_word(sql: &[u8]) -> &[u8] {
    let sql = trim_start(sql);
    let end = sql.iter().position(|c| !c.is_ascii_alphabetic()).unwrap_or(sql.len());
    &sql[..end]
}

/// A lone `COMMIT` or `END` (with WORK, TRANSACTION or AND [NO] CHAIN), after any comments:
/// cheap enough to ask of every statement. `COMMIT PREPARED` is not one.
#[must_use]
pub fn is_commit(sql: &[u8]) -> bool {
    let (_, body) = leading_comments(sql);
    let word = first_word(body);
    if body.len() > 64 || !(word.eq_ignore_ascii_case(b"commit") || word.eq_ignore_ascii_case(b"end")) {
        return false;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    let mut words = text.trim().trim_end_matches(';').split_whitespace();
    matches!(words.next(), Some("commit" | "end"))
        && words.all(|w| matches!(w, "work" | "transaction" | "and" | "no" | "chain"))
}

/// A session command about pgrouter's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET pgrouter.route = ...`; `None` is `default` (no override).
    SetRoute(Option<RouteHint>),
    ResetRoute,
    ShowRoute,
}

/// Recognises `SET [SESSION] pgrouter.route {=|TO} 'v'`, `RESET pgrouter.route` and
/// `SHOW pgrouter.route` (case-insensitive, after any comments, optional trailing semicolon).
/// `Err` for a command about a `pgrouter.*` setting that is not exactly one of those: it is
/// refused rather than forwarded, so it can never be silently ignored.
pub fn session_command(sql: &[u8]) -> Option<Result<SessionCommand, String>> {
    let (_, body) = leading_comments(sql);
    // SET, RESET or SHOW: most statements are turned away by their first word
    let verb = first_word(body);
    if !(verb.eq_ignore_ascii_case(b"set") || verb.eq_ignore_ascii_case(b"reset") || verb.eq_ignore_ascii_case(b"show"))
    {
        return None;
    }
    let head = &body[..body.len().min(64)];
    if !head.windows(9).any(|w| w.eq_ignore_ascii_case(b"pgrouter.")) {
        return None;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase().replace('=', " = ");
    let text = text.trim().trim_end_matches(';');
    let words: Vec<&str> = text.split_whitespace().collect();
    let (verb, rest) = words.split_first()?;
    if !matches!(*verb, "set" | "reset" | "show") {
        return None;
    }
    let name_at = usize::from(matches!(rest.first(), Some(&"session" | &"local")));
    let name = rest.get(name_at)?;
    let setting = name.strip_prefix("pgrouter.")?;
    if setting != "route" {
        return Some(Err(format!(
            "unrecognized configuration parameter \"pgrouter.{setting}\" (pgrouter knows pgrouter.route)"
        )));
    }
    const USAGE: &str = "pgrouter.route commands must be sent alone: SET pgrouter.route = 'primary' | 'replica' | 'default', RESET pgrouter.route or SHOW pgrouter.route";
    Some(match (*verb, rest) {
        ("show", [_]) => Ok(SessionCommand::ShowRoute),
        ("reset", [_]) => Ok(SessionCommand::ResetRoute),
        ("set", ["local", ..]) => {
            Err("SET LOCAL pgrouter.route is not supported: pgrouter settings last for the session".into())
        }
        ("set", [_, "=" | "to", value] | ["session", _, "=" | "to", value]) => {
            match value.trim_matches(|c| c == '\'' || c == '"') {
                "default" => Ok(SessionCommand::SetRoute(None)),
                v => RouteHint::parse(v).map(|h| SessionCommand::SetRoute(Some(h))).ok_or_else(|| {
                    format!("invalid value for pgrouter.route: \"{v}\" (expected primary, replica or default)")
                }),
            }
        }
        _ => Err(USAGE.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_hints() {
        let h = parse_hints(b"  /* pgrouter: route=primary */ select 1").unwrap();
        assert_eq!(h.route, Some(RouteHint::Primary));
        let h = parse_hints(b"/* app: x */ -- pgrouter: route=replica shard=2\nselect 1").unwrap();
        assert_eq!((h.route, h.shard), (Some(RouteHint::Replica), Some(2)));
        let h = parse_hints(b"/* pgrouter: shard_key='42' */ select").unwrap();
        assert_eq!(h.shard_key.as_deref(), Some("42"));
        assert!(parse_hints(b"select 1 /* pgrouter: route=primary */").unwrap().is_empty(), "only leading comments");
        assert!(parse_hints(b"/* pgrouter: route=anywhere */ select 1").is_err());
        assert!(parse_hints(b"/* pgrouter: color=blue */ select 1").is_err());
        let h = parse_hints(b"-- pgrouter: route=primary\rselect 1").unwrap();
        assert_eq!(h.route, Some(RouteHint::Primary), "-- comments end at a carriage return");
    }

    #[test]
    fn commits() {
        for yes in ["COMMIT", "commit;", " /* x */ END WORK", "COMMIT AND NO CHAIN", "end transaction ;"] {
            assert!(is_commit(yes.as_bytes()), "{yes}");
        }
        for no in ["COMMIT PREPARED 'x'", "ROLLBACK", "SELECT 1; COMMIT", "commitx", "END; SELECT 1"] {
            assert!(!is_commit(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn session_commands() {
        let cmd = |s: &str| session_command(s.as_bytes());
        assert_eq!(cmd("SET pgrouter.route = 'primary'"), Some(Ok(SessionCommand::SetRoute(Some(RouteHint::Primary)))));
        assert_eq!(
            cmd("set session pgrouter.route to replica;"),
            Some(Ok(SessionCommand::SetRoute(Some(RouteHint::Replica))))
        );
        assert_eq!(cmd("SET pgrouter.route='default'"), Some(Ok(SessionCommand::SetRoute(None))));
        assert_eq!(cmd("RESET pgrouter.route"), Some(Ok(SessionCommand::ResetRoute)));
        assert_eq!(cmd("show pgrouter.route"), Some(Ok(SessionCommand::ShowRoute)));
        assert!(matches!(cmd("SET pgrouter.route = 'sideways'"), Some(Err(_))));
        assert!(matches!(cmd("SET pgrouter.colour = 'red'"), Some(Err(_))));
        assert_eq!(
            cmd("/* app */ -- x\rSET pgrouter.route = replica"),
            Some(Ok(SessionCommand::SetRoute(Some(RouteHint::Replica))))
        );
        assert!(matches!(cmd("SHOW pgrouter.route ; DROP TABLE t"), Some(Err(_))), "never drop the rest silently");
        assert!(matches!(cmd("SET LOCAL pgrouter.route = primary"), Some(Err(_))));
        assert!(matches!(cmd("SET pgrouter.route"), Some(Err(_))));
        assert_eq!(cmd("SET search_path = app"), None);
        assert_eq!(cmd("select 'pgrouter.route'"), None);
        assert_eq!(cmd("SELECT pgrouter.route FROM t"), None);
        assert_eq!(cmd("settings pgrouter.route = primary"), None);
    }

    #[test]
    fn first_words() {
        assert_eq!(first_word(b"  SELECT 1"), b"SELECT");
        assert_eq!(first_word(b"\n\tcommit;"), b"commit");
        assert_eq!(first_word(b"set/**/x"), b"set");
        assert_eq!(first_word(b"(select 1)"), b"");
        assert_eq!(first_word(b""), b"");
    }
}
