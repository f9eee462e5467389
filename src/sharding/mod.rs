//! Where a sharded table's rows live: shard-key values typed as the key column, and the
//! placement function of each `[[databases.sharded_tables]]` entry (DESIGN §5). Pure code: no
//! SQL parsing, no sockets.

pub mod combine;
pub mod hash;

use std::collections::HashMap;
use std::fmt;

use crate::config::{KeyType, KeyValue, Scheme, ShardedTable};

/// A shard-key value, typed as the key column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Text(s) => write!(f, "'{s}'"),
            Self::Uuid(b) => {
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// How one sharded table places its rows.
#[derive(Debug, Clone)]
pub struct Placement {
    key_type: KeyType,
    shards: usize,
    scheme: Mapping,
}

#[derive(Debug, Clone)]
enum Mapping {
    Hash,
    /// `[from, to)` -> shard, in config order (the first match wins).
    Range(Vec<(Option<Key>, Option<Key>, usize)>),
    List(HashMap<Key, usize>),
}

impl Placement {
    /// The placement of `table` over `shards` shards. Range and list bounds that do not fit
    /// the key type are reported with the table's name.
    pub fn new(table: &ShardedTable, shards: usize) -> Result<Self, String> {
        let key_type = table.key_type;
        let typed = |v: &KeyValue| match v {
            KeyValue::Int(n) => key_from_int(key_type, *n),
            KeyValue::Text(s) => key_from_text(key_type, s),
        };
        let scheme = match table.scheme {
            Scheme::Hash => Mapping::Hash,
            Scheme::Range => Mapping::Range(
                table
                    .ranges
                    .iter()
                    .map(|r| {
                        Ok((r.from.as_ref().map(typed).transpose()?, r.to.as_ref().map(typed).transpose()?, r.shard))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            Scheme::List => {
                let mut map = HashMap::new();
                for list in &table.lists {
                    for v in &list.values {
                        map.insert(typed(v)?, list.shard);
                    }
                }
                Mapping::List(map)
            }
        };
        Ok(Self { key_type, shards, scheme })
    }

    #[must_use]
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// A key given as text: a SQL literal's value, or a Bind parameter in text format.
    pub fn key_from_text(&self, text: &str) -> Result<Key, String> {
        key_from_text(self.key_type, text)
    }

    /// A Bind parameter in binary format.
    ///
    /// `declared` is the parameter's type OID from its Parse; 0 (none) means the server gives
    /// it the key column's type. A smaller integer type is widened as PostgreSQL casts it
    /// (psycopg sends a small Python int as int2); other declared types are refused rather
    /// than guessed at.
    pub fn key_from_binary(&self, raw: &[u8], declared: u32) -> Result<Key, String> {
        const INT8: u32 = 20;
        const INT2: u32 = 21;
        const INT4: u32 = 23;
        const TEXT: u32 = 25;
        const VARCHAR: u32 = 1043;
        const UUID: u32 = 2950;
        let name = type_name(self.key_type);
        let wrong = || format!("a binary {name} parameter cannot be {} bytes long", raw.len());
        match (self.key_type, declared) {
            (KeyType::Bigint | KeyType::Integer, 0 | INT2 | INT4 | INT8) => {
                let width = match (declared, self.key_type) {
                    (INT2, _) => 2,
                    (INT4, _) | (0, KeyType::Integer) => 4,
                    _ => 8,
                };
                let value = match (width, raw.len()) {
                    (2, 2) => i64::from(i16::from_be_bytes([raw[0], raw[1]])),
                    (4, 4) => i64::from(i32::from_be_bytes(raw.try_into().map_err(|_| wrong())?)),
                    (8, 8) => i64::from_be_bytes(raw.try_into().map_err(|_| wrong())?),
                    _ => return Err(wrong()),
                };
                if self.key_type == KeyType::Integer && i32::try_from(value).is_err() {
                    return Err(format!("{value} is out of range for an integer shard key"));
                }
                Ok(Key::Int(value))
            }
            (KeyType::Uuid, 0 | UUID) => Ok(Key::Uuid(raw.try_into().map_err(|_| wrong())?)),
            (KeyType::Text, 0 | TEXT | VARCHAR) => {
                Ok(Key::Text(String::from_utf8(raw.to_vec()).map_err(|_| "a text key is not valid UTF-8".to_owned())?))
            }
            (_, other) => Err(format!("a binary parameter of type OID {other} is not read as a {name} shard key")),
        }
    }

    /// The shard a key lives on; an error for a range or list scheme that does not map it.
    pub fn shard(&self, key: &Key) -> Result<usize, String> {
        match &self.scheme {
            Mapping::Hash => Ok(hash::remainder(self.hash(key), self.shards)),
            Mapping::Range(ranges) => ranges
                .iter()
                .find(|(from, to, _)| from.as_ref().is_none_or(|f| key >= f) && to.as_ref().is_none_or(|t| key < t))
                .map(|r| r.2)
                .ok_or_else(|| format!("no range in the config holds shard key {key}")),
            Mapping::List(map) => {
                map.get(key).copied().ok_or_else(|| format!("no list in the config holds shard key {key}"))
            }
        }
    }

    /// The row hash PostgreSQL computes for this key (see `hash`).
    fn hash(&self, key: &Key) -> u64 {
        match (key, self.key_type) {
            (Key::Int(v), KeyType::Integer) => hash::int4(i32::try_from(*v).unwrap_or_default()),
            (Key::Int(v), _) => hash::int8(*v),
            (Key::Text(s), _) => hash::text(s.as_bytes()),
            (Key::Uuid(b), _) => hash::uuid(b),
        }
    }
}

fn type_name(t: KeyType) -> &'static str {
    match t {
        KeyType::Bigint => "bigint",
        KeyType::Integer => "integer",
        KeyType::Text => "text",
        KeyType::Uuid => "uuid",
    }
}

fn key_from_int(t: KeyType, n: i64) -> Result<Key, String> {
    match t {
        KeyType::Bigint => Ok(Key::Int(n)),
        KeyType::Integer if i32::try_from(n).is_ok() => Ok(Key::Int(n)),
        KeyType::Integer => Err(format!("{n} is out of range for an integer shard key")),
        KeyType::Text => Ok(Key::Text(n.to_string())),
        KeyType::Uuid => Err(format!("{n} is not a uuid")),
    }
}

/// Parses a key the way PostgreSQL's input functions would (int8in, int4in, uuid_in; text is
/// itself).
fn key_from_text(t: KeyType, text: &str) -> Result<Key, String> {
    match t {
        KeyType::Text => Ok(Key::Text(text.to_owned())),
        KeyType::Bigint | KeyType::Integer => {
            let n: i64 =
                text.trim().parse().map_err(|_| format!("invalid input for a {} shard key: {text:?}", type_name(t)))?;
            key_from_int(t, n)
        }
        KeyType::Uuid => {
            parse_uuid(text).map(Key::Uuid).ok_or_else(|| format!("invalid input for a uuid shard key: {text:?}"))
        }
    }
}

/// uuid_in's forms: 32 hex digits, optionally in braces, with a hyphen allowed after any
/// group of four digits.
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let s = text.trim();
    let s = s.strip_prefix('{').map_or(Some(s), |inner| inner.strip_suffix('}'))?;
    let mut out = [0u8; 16];
    let mut digits = 0usize;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '-' {
            if digits == 0 || digits % 4 != 0 || digits == 32 || chars.peek() == Some(&'-') {
                return None;
            }
            continue;
        }
        let v = c.to_digit(16)?;
        if digits >= 32 {
            return None;
        }
        out[digits / 2] |= (v as u8) << if digits % 2 == 0 { 4 } else { 0 };
        digits += 1;
    }
    (digits == 32).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ListMapping, RangeMapping};

    fn table(key_type: KeyType, scheme: Scheme) -> ShardedTable {
        ShardedTable {
            table: "t".into(),
            column: "k".into(),
            key_type,
            scheme,
            ranges: vec![
                RangeMapping { shard: 0, from: None, to: Some(KeyValue::Int(100)) },
                RangeMapping { shard: 1, from: Some(KeyValue::Int(100)), to: Some(KeyValue::Int(1000)) },
            ],
            lists: vec![
                ListMapping { shard: 1, values: vec![KeyValue::Text("eu".into()), KeyValue::Text("uk".into())] },
                ListMapping { shard: 0, values: vec![KeyValue::Text("us".into())] },
            ],
        }
    }

    #[test]
    fn keys_parse_like_postgresql() {
        let p = Placement::new(&table(KeyType::Uuid, Scheme::Hash), 2).unwrap();
        let want = p.key_from_text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        for form in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(p.key_from_text(form).unwrap(), want, "{form}");
        }
        assert!(p.key_from_text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1").is_err());
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        let p = Placement::new(&table(KeyType::Integer, Scheme::Hash), 2).unwrap();
        assert!(p.key_from_text("2147483648").is_err());
        assert_eq!(p.key_from_binary(&7i32.to_be_bytes(), 0).unwrap(), Key::Int(7));
        assert!(p.key_from_binary(&7i64.to_be_bytes(), 0).is_err());
        assert_eq!(p.key_from_binary(&(-7i16).to_be_bytes(), 21).unwrap(), Key::Int(-7), "int2 widened");
        assert!(p.key_from_binary(&(1i64 << 40).to_be_bytes(), 20).is_err(), "beyond integer");
        assert!(p.key_from_binary(&7f64.to_be_bytes(), 701).is_err(), "float8 is not guessed at");
        let p = Placement::new(&table(KeyType::Bigint, Scheme::Hash), 2).unwrap();
        assert_eq!(p.key_from_binary(&7i16.to_be_bytes(), 21).unwrap(), Key::Int(7));
        assert_eq!(p.key_from_binary(&7i32.to_be_bytes(), 23).unwrap(), Key::Int(7));
        assert!(p.key_from_binary(&7i32.to_be_bytes(), 0).is_err(), "undeclared: the column's width");
    }

    #[test]
    fn range_and_list_schemes() {
        let p = Placement::new(&table(KeyType::Bigint, Scheme::Range), 2).unwrap();
        assert_eq!(p.shard(&Key::Int(-5)).unwrap(), 0);
        assert_eq!(p.shard(&Key::Int(99)).unwrap(), 0);
        assert_eq!(p.shard(&Key::Int(100)).unwrap(), 1);
        assert!(p.shard(&Key::Int(1000)).is_err(), "the upper bound is exclusive");
        let p = Placement::new(&table(KeyType::Text, Scheme::List), 2).unwrap();
        assert_eq!(p.shard(&Key::Text("uk".into())).unwrap(), 1);
        assert_eq!(p.shard(&Key::Text("us".into())).unwrap(), 0);
        assert!(p.shard(&Key::Text("jp".into())).unwrap_err().contains("'jp'"));
    }
}
