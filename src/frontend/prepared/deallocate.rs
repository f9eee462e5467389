//! DEALLOCATE of the client's named statements, which the proxy answers itself under
//! transaction pooling (they exist on the servers under other names).

use super::ClientStatements;

/// What a `DEALLOCATE` statement names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deallocate {
    All,
    Name(Vec<u8>),
}

/// Recognises `DEALLOCATE [PREPARE] name | ALL` (which PostgreSQL applies to protocol-level
/// statements too, so the proxy answers it for the client's renamed ones).
#[must_use]
pub fn deallocate(sql: &[u8]) -> Option<Deallocate> {
    if !may_deallocate(sql) || !crate::router::hint::first_word(sql).eq_ignore_ascii_case(b"deallocate") {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?.trim().trim_end_matches(';').trim();
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case("all") {
        return Some(Deallocate::All);
    }
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    };
    Some(Deallocate::Name(name.into_bytes()))
}

/// False if `text` (a statement, or the start of one) cannot be a DEALLOCATE: asked of every
/// Query, so most are turned away by their first letter, before their end is looked for.
#[must_use]
pub fn may_deallocate(text: &[u8]) -> bool {
    matches!(text.trim_ascii_start().first(), Some(b'd' | b'D'))
}

impl ClientStatements {
    /// Whether the client has a statement of this name.
    #[must_use]
    pub fn contains(&self, name: &[u8]) -> bool {
        self.by_name.contains_key(name)
    }

    /// `sql` as a DEALLOCATE of the client's protocol-level statements, which the proxy
    /// answers itself.
    #[must_use]
    pub fn local_deallocate(&self, sql: &[u8]) -> Option<Deallocate> {
        deallocate(sql).filter(|d| match d {
            Deallocate::All => true,
            Deallocate::Name(name) => self.contains(name),
        })
    }

    /// Applies a DEALLOCATE the proxy answers itself; false if the statement is not one of
    /// the client's protocol-level ones (then the server must see it).
    pub fn deallocate(&mut self, what: &Deallocate) -> bool {
        match what {
            Deallocate::All => {
                self.clear();
                true
            }
            Deallocate::Name(name) => self.remove(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_statements() {
        assert_eq!(deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(deallocate(b"deallocate prepare S_1;"), Some(Deallocate::Name(b"s_1".to_vec())));
        assert_eq!(deallocate(b"DEALLOCATE \"S_1\""), Some(Deallocate::Name(b"S_1".to_vec())));
        assert_eq!(deallocate(b"DEALLOCATE a; select 1"), None);
        assert_eq!(deallocate(b"select 1"), None);
        assert_eq!(deallocate(b"\n  Deallocate all"), Some(Deallocate::All));
        assert_eq!(deallocate(b"DEALLOCATEX ALL"), None);
    }
}
