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

    #[test]
    fn different_statements_differ() {
        assert_ne!(shape("select 1 for update"), shape("select 1"));
        assert_ne!(shape("select nextval('s')"), shape("select currval('s')"));
    }
}
