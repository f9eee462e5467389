//! `COPY table FROM STDIN` into a sharded table (DESIGN §5): what the statement says about
//! its data (column list, text or CSV format, delimiter, quoting, NULL string, header), and a
//! splitter that cuts the client's CopyData stream into rows and reads one field of a row,
//! so that each row can be sent to its shard. Rows are cut where PostgreSQL's COPY cuts them
//! (`copyfromparse.c`): in text format at a newline not escaped by a backslash, in CSV at a
//! newline outside quotes. Binary format is refused.

use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::keys::normalise;

/// A `COPY ... FROM STDIN` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    /// The table, normalised (see [`normalise`]).
    pub table: String,
    /// The table as written, to look its columns up with `'...'::regclass`.
    pub table_sql: String,
    /// The column list, normalised; empty: every column in table order.
    pub columns: Vec<String>,
    pub format: CopyFormat,
    /// The first line is a header (every shard gets it).
    pub header: bool,
}

/// How the rows are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    pub csv: bool,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: u8,
    pub null: Vec<u8>,
}

/// The COPY FROM STDIN the text is, if it is one; an error for one this cannot split.
#[must_use]
pub fn copy_from_stdin(sql: &str) -> Option<Result<CopyIn, String>> {
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let [
        Statement::Copy {
            source: CopySource::Table { table_name, columns },
            to: false,
            target,
            options,
            legacy_options,
            ..
        },
    ] = parsed.as_slice()
    else {
        return None;
    };
    if *target != CopyTarget::Stdin {
        return None;
    }
    let mut csv = false;
    let (mut delimiter, mut quote, mut escape, mut null, mut header) = (None, None, None, None, false);
    for option in options {
        match option {
            CopyOption::Format(name) => match name.value.to_lowercase().as_str() {
                "csv" => csv = true,
                "text" => csv = false,
                other => return Some(Err(format!("COPY in {other} format cannot be split between shards yet"))),
            },
            CopyOption::Delimiter(c) => delimiter = Some(*c),
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = Some(*c),
            CopyOption::Escape(c) => escape = Some(*c),
            _ => {}
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Binary => {
                return Some(Err("COPY in binary format cannot be split between shards yet".into()));
            }
            CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            CopyLegacyOption::Csv(csv_options) => {
                csv = true;
                for o in csv_options {
                    match o {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(c) => quote = Some(*c),
                        CopyLegacyCsvOption::Escape(c) => escape = Some(*c),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let byte = |c: Option<char>, default: u8| match c {
        None => Ok(default),
        Some(c) if c.is_ascii() => Ok(c as u8),
        Some(c) => {
            Err(format!("COPY with the non-ASCII character {c:?} as delimiter, quote or escape cannot be split"))
        }
    };
    let format = (|| {
        let delimiter = byte(delimiter, if csv { b',' } else { b'\t' })?;
        let quote = byte(quote, b'"')?;
        Ok(CopyFormat {
            csv,
            delimiter,
            quote,
            escape: byte(escape, quote)?,
            null: null.unwrap_or_else(|| if csv { String::new() } else { "\\N".into() }).into_bytes(),
        })
    })();
    Some(format.map(|format| {
        CopyIn {
            table: normalise(table_name),
            table_sql: table_name.to_string(),
            columns: columns
                .iter()
                .map(|c| if c.quote_style.is_some() { c.value.clone() } else { c.value.to_lowercase() })
                .collect(),
            format,
            header,
        }
    }))
}

/// Cuts a CopyData stream into rows (each with its newline).
#[derive(Debug)]
pub struct RowSplitter {
    format: CopyFormat,
    buf: Vec<u8>,
    /// How far `buf` has been scanned, and the state there.
    scanned: usize,
    in_quotes: bool,
    escaped: bool,
    /// Where the complete rows in `buf` end.
    ends: Vec<usize>,
}

impl RowSplitter {
    #[must_use]
    pub fn new(format: CopyFormat) -> Self {
        Self { format, buf: Vec::new(), scanned: 0, in_quotes: false, escaped: false, ends: Vec::new() }
    }

    /// Adds data; then [`RowSplitter::rows`] gives the rows it completed.
    pub fn feed(&mut self, data: &[u8]) {
        let start = self.ends.last().copied().unwrap_or(0);
        if start > 0 {
            self.buf.drain(..start);
            self.scanned -= start;
        }
        self.ends.clear();
        self.buf.extend_from_slice(data);
        let f = &self.format;
        for (i, &b) in self.buf.iter().enumerate().skip(self.scanned) {
            if self.escaped {
                self.escaped = false;
            } else if f.csv {
                if self.in_quotes && b == f.escape && f.escape != f.quote {
                    self.escaped = true;
                } else if b == f.quote {
                    self.in_quotes = !self.in_quotes;
                } else if b == b'\n' && !self.in_quotes {
                    self.ends.push(i + 1);
                }
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'\n' {
                self.ends.push(i + 1);
            }
        }
        self.scanned = self.buf.len();
    }

    /// The rows the last [`RowSplitter::feed`] completed.
    pub fn rows(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let row = &self.buf[start..end];
            start = end;
            row
        })
    }

    /// What is left once the data ended: a last row without a newline, if any.
    #[must_use]
    pub fn rest(&self) -> &[u8] {
        &self.buf[self.ends.last().copied().unwrap_or(0)..]
    }

    /// Field `index` of `row`, decoded (None: NULL); an error if the row has fewer fields.
    pub fn field(&self, row: &[u8], index: usize) -> Result<Option<String>, String> {
        let f = &self.format;
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        let mut field = 0;
        let (mut raw_start, mut value, mut quoted, mut in_quotes) = (0, Vec::new(), false, false);
        let mut bytes = row.iter().enumerate().peekable();
        while let Some((i, &b)) = bytes.next() {
            let at_end_of_field = if f.csv {
                if in_quotes && b == f.escape && bytes.peek().is_some_and(|&(_, &n)| n == f.quote || n == f.escape) {
                    // an escaped quote (or escape) inside quotes
                    let (_, &n) = bytes.next().expect("peeked");
                    value.push(n);
                    false
                } else if b == f.quote {
                    in_quotes = !in_quotes;
                    quoted = true;
                    false
                } else if b == f.delimiter && !in_quotes {
                    true
                } else {
                    value.push(b);
                    false
                }
            } else if b == b'\\' {
                let (_, &n) = bytes.next().ok_or("a COPY row ends in a backslash")?;
                value.extend_from_slice(&unescape(n, &mut bytes));
                false
            } else if b == f.delimiter {
                true
            } else {
                value.push(b);
                false
            };
            if at_end_of_field {
                if field == index {
                    return decode(&row[raw_start..i], value, quoted, f);
                }
                field += 1;
                (raw_start, quoted) = (i + 1, false);
                value.clear();
            }
        }
        if field == index {
            return decode(&row[raw_start..], value, quoted, f);
        }
        Err(format!("a COPY row has {} fields; the shard key is field {}", field + 1, index + 1))
    }
}

/// A field's value: NULL if its raw text is the NULL string (unquoted, in CSV).
fn decode(raw: &[u8], value: Vec<u8>, quoted: bool, f: &CopyFormat) -> Result<Option<String>, String> {
    if raw == f.null.as_slice() && !quoted {
        return Ok(None);
    }
    String::from_utf8(value).map(Some).map_err(|_| "a COPY shard key is not valid UTF-8".to_owned())
}

/// What a backslash sequence of the text format stands for (`n` is the byte after it).
fn unescape<'a>(n: u8, rest: &mut std::iter::Peekable<impl Iterator<Item = (usize, &'a u8)>>) -> Vec<u8> {
    match n {
        b'b' => vec![8],
        b'f' => vec![12],
        b'n' => vec![b'\n'],
        b'r' => vec![b'\r'],
        b't' => vec![b'\t'],
        b'v' => vec![11],
        b'0'..=b'7' => vec![digits(u32::from(n - b'0'), 8, 3, rest)],
        b'x' if rest.peek().is_some_and(|(_, d)| d.is_ascii_hexdigit()) => {
            let (_, &d) = rest.next().expect("peeked");
            vec![digits(char::from(d).to_digit(16).unwrap_or(0), 16, 2, rest)]
        }
        other => vec![other],
    }
}

/// An octal or hex escape's byte: `first` digit, then up to `most - 1` more from `rest`.
fn digits<'a>(
    first: u32,
    radix: u32,
    most: usize,
    rest: &mut std::iter::Peekable<impl Iterator<Item = (usize, &'a u8)>>,
) -> u8 {
    let mut v = first;
    for _ in 1..most {
        match rest.peek().and_then(|&(_, &d)| char::from(d).to_digit(radix)) {
            Some(d) => {
                v = v * radix + d;
                rest.next();
            }
            None => break,
        }
    }
    u8::try_from(v & 0xff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(copy: &CopyIn, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = RowSplitter::new(copy.format.clone());
        let mut rows = Vec::new();
        for chunk in chunks {
            s.feed(chunk);
            rows.extend(s.rows().map(<[u8]>::to_vec));
        }
        if !s.rest().is_empty() {
            rows.push(s.rest().to_vec());
        }
        rows
    }

    #[test]
    fn statements() {
        let c = copy_from_stdin("copy Orders (customer_id, \"Note\") from stdin").unwrap().unwrap();
        assert_eq!(
            (c.table.as_str(), c.columns.clone(), c.format.csv),
            ("orders", vec!["customer_id".into(), "Note".into()], false)
        );
        assert_eq!((c.format.delimiter, c.format.null.as_slice()), (b'\t', &b"\\N"[..]));
        let c = copy_from_stdin("COPY s.orders FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';')").unwrap().unwrap();
        assert_eq!((c.table.as_str(), c.format.csv, c.header, c.format.delimiter), ("s.orders", true, true, b';'));
        let c = copy_from_stdin("copy orders from stdin csv header quote '''' ").unwrap().unwrap();
        assert_eq!((c.format.quote, c.format.escape, c.header), (b'\'', b'\'', true));
        assert!(copy_from_stdin("copy orders from stdin (format binary)").unwrap().is_err());
        assert!(copy_from_stdin("copy orders to stdout").is_none());
        assert!(copy_from_stdin("select 1").is_none());
    }

    #[test]
    fn text_rows_and_fields() {
        let c = copy_from_stdin("copy t from stdin").unwrap().unwrap();
        let rows = split(&c, &[b"1\ta\\\nb\n2\t", b"x\\ty\n", b"\\N\tz\n3\tlast"]);
        assert_eq!(rows, [&b"1\ta\\\nb\n"[..], b"2\tx\\ty\n", b"\\N\tz\n", b"3\tlast"]);
        let s = RowSplitter::new(c.format.clone());
        assert_eq!(s.field(&rows[0], 0).unwrap().as_deref(), Some("1"));
        assert_eq!(s.field(&rows[0], 1).unwrap().as_deref(), Some("a\nb"));
        assert_eq!(s.field(&rows[1], 1).unwrap().as_deref(), Some("x\ty"));
        assert_eq!(s.field(&rows[2], 0).unwrap(), None);
        assert_eq!(s.field(b"\\061\\x32\t\n", 0).unwrap().as_deref(), Some("12"));
        assert!(s.field(&rows[3], 2).is_err());
    }

    #[test]
    fn csv_rows_and_fields() {
        let c = copy_from_stdin("copy t from stdin (format csv)").unwrap().unwrap();
        let rows = split(&c, &[b"1,\"a,\n\"\"b\"\"\"\r\n\"2\",", b"x\n,empty\n\"\",q\n"]);
        assert_eq!(rows.len(), 4, "{rows:?}");
        let s = RowSplitter::new(c.format.clone());
        assert_eq!(s.field(&rows[0], 1).unwrap().as_deref(), Some("a,\n\"b\""));
        assert_eq!(s.field(&rows[1], 0).unwrap().as_deref(), Some("2"));
        assert_eq!(s.field(&rows[2], 0).unwrap(), None, "an unquoted empty field is NULL");
        assert_eq!(s.field(&rows[3], 0).unwrap().as_deref(), Some(""), "a quoted empty field is not");
    }
}
