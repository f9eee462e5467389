//! The shape of a statement: its text with literals replaced by `?`, comments dropped,
//! whitespace collapsed and unquoted words lower-cased, computed in one pass over the bytes
//! (no tokenizer, no allocation beyond the output buffer).
//!
//! Two statements with the same shape classify the same way, so ORMs that inline literals
//! (`WHERE id = 42`, `WHERE id = 43`) share one cache entry. The scanner follows PostgreSQL's
//! lexical rules for what it must skip: '...' strings with '' escapes, E'...' with backslash
//! escapes, $tag$...$tag$ dollar quoting, "..." identifiers (kept), -- and nested /* */
//! comments, and numeric literals (PostgreSQL docs, "Lexical Structure").

/// A statement's shape and the byte ranges of its literals in the original text, in order:
/// a cached classification names key values by their literal's position, so a cache hit
/// finds them without parsing (see `router::keys`).
#[derive(Debug, Default, Clone)]
pub struct Shape {
    pub text: Vec<u8>,
    pub literals: Vec<(usize, usize)>,
}

impl Shape {
    /// Shapes `sql`, replacing what was here.
    pub fn of(&mut self, sql: &[u8]) {
        self.literals.clear();
        scan(sql, &mut self.text, &mut self.literals);
    }

    /// Moves this shape, made of `last`, over to `sql` without scanning it, if the two texts
    /// differ only inside their quoted strings and numbers (a statement run again with other
    /// values inlined, as drivers that interpolate parameters send it): the shape stays and
    /// the literals' ranges become `sql`'s. Returns false when that cannot be shown; the
    /// literals are then left half moved, and the caller shapes `sql` with [`Shape::of`].
    ///
    /// Why this gives [`Shape::of`]'s answer: the bytes before a literal are the same, so the
    /// scanner reaches it in the same state; the new literal opens the way the old one did
    /// (the same quote, or a digit), so the scanner takes it the same way and it ends where
    /// the same skip ends it; what follows is the same again, and the state after a literal
    /// is the same whatever its value (a `?` written, no space pending).
    pub fn relit(&mut self, last: &[u8], sql: &[u8]) -> bool {
        let (mut old, mut new) = (0, 0);
        for literal in &mut self.literals {
            let (start, end) = *literal;
            let same = &last[old..start];
            if sql.get(new..new + same.len()) != Some(same) {
                return false;
            }
            new += same.len();
            let next = match (last[start], sql.get(new)) {
                (b'\'', Some(b'\'')) => skip_string(sql, new + 1, false),
                (b'0'..=b'9', Some(c)) if c.is_ascii_digit() => skip_number(sql, new),
                _ => return false,
            };
            *literal = (new, next);
            (old, new) = (end, next);
        }
        last[old..] == sql[new..]
    }
}

/// Writes the shape of `sql` into `out` (cleared first).
pub fn shape_into(sql: &[u8], out: &mut Vec<u8>) {
    scan(sql, out, &mut Vec::new());
}

fn scan(sql: &[u8], out: &mut Vec<u8>, literals: &mut Vec<(usize, usize)>) {
    out.clear();
    // a shape is never longer than its statement
    out.reserve(sql.len());
    let mut i = 0;
    let n = sql.len();
    let mut pending_space = false;
    while i < n {
        let c = sql[i];
        let start = i;
        i = match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                pending_space = !out.is_empty();
                i + 1
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                pending_space = !out.is_empty();
                skip_line_comment(sql, i)
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                pending_space = !out.is_empty();
                skip_block_comment(sql, i)
            }
            _ => {
                if pending_space {
                    out.push(b' ');
                    pending_space = false;
                }
                // most tokens are words: copied at once, without the literal checks below
                if is_ident_char(c) && !c.is_ascii_digit() && sql.get(i + 1) != Some(&b'\'') {
                    word(sql, i, out)
                } else {
                    let end = shape_token(sql, i, out);
                    if out.last() == Some(&b'?') && sql[i] != b'?' {
                        literals.push((i, end));
                    }
                    end
                }
            }
        };
        debug_assert!(i > start);
    }
}

/// Shapes one token starting at `i` (not whitespace or a comment); returns where it ends.
fn shape_token(sql: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let c = sql[i];
    match c {
        b'\'' => {
            out.push(b'?');
            skip_string(sql, i + 1, false)
        }
        b'e' | b'E' if sql.get(i + 1) == Some(&b'\'') && !ident_before(out) => {
            out.push(b'?');
            skip_string(sql, i + 2, true)
        }
        // B'..', X'..', N'..' bit, hex and national strings
        b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if sql.get(i + 1) == Some(&b'\'') && !ident_before(out) => {
            out.push(b'?');
            skip_string(sql, i + 2, false)
        }
        b'"' => copy_quoted_ident(sql, i, out),
        b'$' => dollar(sql, i, out),
        b'0'..=b'9' if !ident_before(out) => {
            out.push(b'?');
            skip_number(sql, i)
        }
        b'.' if sql.get(i + 1).is_some_and(u8::is_ascii_digit) && !ident_before(out) => {
            out.push(b'?');
            skip_number(sql, i)
        }
        _ if is_ident_char(c) => word(sql, i, out),
        _ => {
            out.push(c);
            i + 1
        }
    }
}

/// Copies the word starting at `i`, lower-cased; returns where it ends.
fn word(sql: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let len = sql[i..].iter().take_while(|&&c| is_ident_char(c)).count();
    out.extend(sql[i..i + len].iter().map(u8::to_ascii_lowercase));
    i + len
}

/// Bytes that continue a word: letters, digits, `_` and every non-ASCII byte.
const IDENT: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
        c += 1;
    }
    table
};

fn is_ident_char(c: u8) -> bool {
    IDENT[usize::from(c)]
}

/// True if the output ends inside a word, so a digit or quote that follows belongs to it
/// (`t1`, `col_2`).
fn ident_before(out: &[u8]) -> bool {
    out.last().is_some_and(|&c| is_ident_char(c) || c == b'$')
}

/// PostgreSQL ends a `--` comment at a newline or a carriage return.
fn skip_line_comment(sql: &[u8], i: usize) -> usize {
    sql[i..].iter().position(|&c| c == b'\n' || c == b'\r').map_or(sql.len(), |p| i + p + 1)
}

/// Block comments nest in PostgreSQL.
fn skip_block_comment(sql: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < sql.len() {
        if sql[i] == b'/' && sql.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if sql[i] == b'*' && sql.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

/// Skips the rest of a '...' string whose opening quote is just before `i`.
fn skip_string(sql: &[u8], mut i: usize, backslash_escapes: bool) -> usize {
    while i < sql.len() {
        match sql[i] {
            b'\\' if backslash_escapes => i += 2,
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    sql.len()
}

fn copy_quoted_ident(sql: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let mut j = i + 1;
    while j < sql.len() {
        if sql[j] == b'"' {
            if sql.get(j + 1) == Some(&b'"') {
                j += 2;
                continue;
            }
            j += 1;
            break;
        }
        j += 1;
    }
    let end = j.min(sql.len());
    out.extend_from_slice(&sql[i..end]);
    end
}

/// `$1` parameters are kept; `$tag$...$tag$` and `$$...$$` strings become `?`.
fn dollar(sql: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let rest = &sql[i + 1..];
    if rest.first().is_some_and(u8::is_ascii_digit) {
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        out.extend_from_slice(&sql[i..=i + digits]);
        return i + 1 + digits;
    }
    let tag_len = rest.iter().take_while(|&&c| is_ident_char(c)).count();
    if !ident_before(out) && rest.get(tag_len) == Some(&b'$') {
        let tag = &sql[i..i + tag_len + 2];
        let body = i + tag.len();
        let end = sql[body..].windows(tag.len()).position(|w| w == tag).map_or(sql.len(), |p| body + p + tag.len());
        out.push(b'?');
        return end;
    }
    out.push(b'$');
    i + 1
}

fn skip_number(sql: &[u8], mut i: usize) -> usize {
    let mut seen_exp = false;
    while i < sql.len() {
        let c = sql[i];
        if c.is_ascii_digit() || c == b'.' || c == b'_' {
            i += 1;
        } else if (c == b'e' || c == b'E') && !seen_exp {
            seen_exp = true;
            i += 1;
            if matches!(sql.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
        } else {
            break;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> String {
        let mut out = Vec::new();
        shape_into(sql.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            shape("SELECT * FROM t WHERE id = 42 AND name = 'bob'"),
            "select * from t where id = ? and name = ?"
        );
        assert_eq!(shape("select 1.5e-3, .5, 'it''s', E'a\\'b', $$x$$, $f$ y $f$"), "select ?, ?, ?, ?, ?, ?");
        assert_eq!(shape("select X'1F', B'101', N'x'"), "select ?, ?, ?");
    }

    #[test]
    fn same_shape_for_different_literals_and_spacing() {
        assert_eq!(
            shape("SELECT  a FROM t\n WHERE id = 1 -- c\n"),
            shape("select a from t where id = 2000 /* other */")
        );
    }

    #[test]
    fn identifiers_keep_their_digits_and_quotes() {
        assert_eq!(shape("select t1.col_2 from \"Tab 1\" t1"), "select t1.col_2 from \"Tab 1\" t1");
        assert_eq!(shape("select $1, $12 from t"), "select $1, $12 from t");
        assert_eq!(shape("select name from e"), "select name from e");
    }

    #[test]
    fn quotes_inside_strings_and_names() {
        assert_eq!(
            shape(r#"select "A""b" from T where x = 'a''b' and y = E'c\'d\\'"#),
            r#"select "A""b" from t where x = ? and y = ?"#
        );
        assert_eq!(shape(r"select E'ends in a backslash\"), "select ?");
        assert_eq!(shape("select 'a'''"), "select ?");
        assert_eq!(shape(r#"select "never closed"#), r#"select "never closed"#);
        assert_eq!(shape("SELECT Émile, _x9 FROM t"), "select Émile, _x9 from t");
    }

    #[test]
    fn nested_comments_and_unterminated_input() {
        assert_eq!(shape("/* a /* b */ c */ select 1"), "select ?");
        assert_eq!(shape("select 'unterminated"), "select ?");
        assert_eq!(shape("select $$never ends"), "select ?");
    }

    #[test]
    fn line_comments_end_at_carriage_returns() {
        assert_ne!(shape("SELECT 1 --x\r; DELETE FROM t"), shape("SELECT 1"));
    }

    /// Shapes `sql` by moving the shape of `last` over, if `relit` can.
    fn relit(last: &str, sql: &str) -> Option<Shape> {
        let mut shape = Shape::default();
        shape.of(last.as_bytes());
        shape.relit(last.as_bytes(), sql.as_bytes()).then_some(shape)
    }

    #[test]
    fn relit_moves_a_shape_to_other_values() {
        let last = "SELECT abalance FROM pgbench_accounts WHERE aid = 7;";
        let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 1234567;";
        let moved = relit(last, sql).expect("only the number differs");
        let mut full = Shape::default();
        full.of(sql.as_bytes());
        assert_eq!(moved.text, full.text);
        assert_eq!(moved.literals, full.literals);
        assert_eq!(&sql[full.literals[0].0..full.literals[0].1], "1234567");
        assert!(
            relit("select * from t where a = 'x' and b = 1.5", "select * from t where a = 'it''s' and b = 22e3")
                .is_some()
        );
    }

    #[test]
    fn relit_refuses_what_it_cannot_show() {
        // a different statement, a literal of another kind, a longer or shorter text
        assert!(relit("select 1 from t", "select 1 from u").is_none());
        assert!(relit("select * from t where a = 1", "select * from t where a = '1'").is_none());
        assert!(relit("select * from t where a = 1", "select * from t where a = 1 and b = 2").is_none());
        assert!(relit("select * from t where a = 1 and b = 2", "select * from t where a = 1").is_none());
        assert!(relit("select 1 -- x", "select 1 -- y").is_none());
        // kinds it leaves to the scanner: E'', X'', dollar quotes
        assert!(relit("select E'a'", "select E'b'").is_none());
        assert!(relit("select X'1F'", "select X'2F'").is_none());
        assert!(relit("select $$a$$", "select $$b$$").is_none());
    }

    /// Whenever `relit` moves a shape, it is the shape a full pass gives, with the same
    /// literals: checked over pairs of statements that differ in their literals and
    /// elsewhere, including values that run into the text around them.
    #[test]
    fn relit_agrees_with_a_full_pass() {
        let templates = [
            "SELECT a FROM t WHERE id = {} AND name = {}",
            "select {}, {} from t1",
            "update t set x = {} where y = {} -- note",
            "select * from t where a in ({}, {}) /* c */",
            "select 'x'||{}||{}",
            "select a{}b, {}",
            "insert into t values ({},{})",
            "select {}{}",
        ];
        let values = [
            "1", "22", "3.5", "4e10", "5e-3", "6_000", "'a'", "'b''c'", "''", "'x", "1a", "'q'r", "1.2.3", "7 ", " 8",
            "'", "E'e'", "$$d$$", "9--c", "0/*c*/", "x", "1e", "'''", "'s' 't'", ".5", "$1",
        ];
        let mut texts = Vec::new();
        for t in templates {
            for a in values {
                for b in ["1", "'b'", "33", "'it''s'", "4.0e+5"] {
                    texts.push(t.replacen("{}", a, 1).replacen("{}", b, 1));
                }
            }
        }
        let mut moved = 0;
        for last in &texts {
            let mut first = Shape::default();
            first.of(last.as_bytes());
            for sql in &texts {
                let mut shape = first.clone();
                if !shape.relit(last.as_bytes(), sql.as_bytes()) {
                    continue;
                }
                moved += 1;
                let mut full = Shape::default();
                full.of(sql.as_bytes());
                assert_eq!(shape.text, full.text, "{last:?} -> {sql:?}");
                assert_eq!(shape.literals, full.literals, "{last:?} -> {sql:?}");
            }
        }
        // the check must have checked something
        assert!(moved > texts.len() * 4, "only {moved} moves");
    }

    #[test]
    fn different_statements_differ() {
        assert_ne!(shape("select 1 for update"), shape("select 1"));
        assert_ne!(shape("select nextval('s')"), shape("select currval('s')"));
    }
}
