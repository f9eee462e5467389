//! Combining the shards' answers to `count`/`sum`/`min`/`max` into the value one database
//! holding every row would give. Values are in text format, as PostgreSQL sends them; only
//! types whose text can be combined exactly are handled (integers and numeric), anything
//! else is an error rather than a guess.

/// An aggregate whose per-shard results combine into the whole result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// count(*) or count(x): the counts add up.
    Count,
    /// sum(x): the sums add up (NULLs, from shards without rows, are skipped).
    Sum,
    Min,
    Max,
}

/// PostgreSQL type OIDs of the results handled.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;

/// An exact decimal: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    fn parse(text: &str) -> Option<Self> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let scale = u32::try_from(frac.len()).ok()?;
        let digits = format!("{int}{frac}");
        Some(Self { mantissa: digits.parse().ok()?, scale })
    }

    fn rescale(self, scale: u32) -> Option<i128> {
        self.mantissa.checked_mul(10i128.checked_pow(scale - self.scale)?)
    }

    fn add(self, other: Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        Some(Self { mantissa: self.rescale(scale)?.checked_add(other.rescale(scale)?)?, scale })
    }

    fn cmp(self, other: Self) -> Option<std::cmp::Ordering> {
        let scale = self.scale.max(other.scale);
        Some(self.rescale(scale)?.cmp(&other.rescale(scale)?))
    }

    fn render(self) -> String {
        if self.scale == 0 {
            return self.mantissa.to_string();
        }
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{}{int}.{frac}", if self.mantissa < 0 { "-" } else { "" })
    }
}

/// Orders two non-NULL values of a result column of type `type_oid` (text format) as
/// PostgreSQL's default ordering does; integers and numeric only.
pub fn compare(type_oid: u32, a: &[u8], b: &[u8]) -> Result<std::cmp::Ordering, String> {
    if !matches!(type_oid, INT2 | INT4 | INT8 | NUMERIC) {
        return Err(format!(
            "ordering a column of type oid {type_oid} across shards is not built yet (integers and numeric are)"
        ));
    }
    let parse = |v: &[u8]| std::str::from_utf8(v).ok().and_then(Decimal::parse);
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x.cmp(y).ok_or_else(|| "values too large to compare".to_owned()),
        // NaN sorts after every number in PostgreSQL
        (None, Some(_)) if a == b"NaN" => Ok(std::cmp::Ordering::Greater),
        (Some(_), None) if b == b"NaN" => Ok(std::cmp::Ordering::Less),
        (None, None) if a == b"NaN" && b == b"NaN" => Ok(std::cmp::Ordering::Equal),
        _ => Err(format!(
            "cannot order the shard values {:?} and {:?}",
            String::from_utf8_lossy(a),
            String::from_utf8_lossy(b)
        )),
    }
}

/// The combined value of one aggregate column, from each shard's value (None: NULL).
pub fn combine(aggregate: Aggregate, type_oid: u32, values: &[Option<&[u8]>]) -> Result<Option<String>, String> {
    if !matches!(type_oid, INT2 | INT4 | INT8 | NUMERIC) {
        return Err(format!(
            "combining {aggregate:?} results of type oid {type_oid} across shards is not built yet (integers and numeric are)"
        ));
    }
    let parse = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .filter(|t| !t.eq_ignore_ascii_case("nan") && !t.contains(['e', 'E', 'I', 'i']))
            .and_then(Decimal::parse)
            .ok_or_else(|| format!("cannot combine the shard value {:?}", String::from_utf8_lossy(v)))
    };
    let mut acc: Option<Decimal> = None;
    for value in values.iter().flatten() {
        let v = parse(value)?;
        acc = Some(match (acc, aggregate) {
            (None, _) => v,
            (Some(a), Aggregate::Count | Aggregate::Sum) => {
                a.add(v).ok_or("the combined sum is too large to compute exactly")?
            }
            (Some(a), Aggregate::Min) => {
                if v.cmp(a).ok_or("values too large to compare")?.is_lt() {
                    v
                } else {
                    a
                }
            }
            (Some(a), Aggregate::Max) => {
                if v.cmp(a).ok_or("values too large to compare")?.is_gt() {
                    v
                } else {
                    a
                }
            }
        });
    }
    Ok(match (acc, aggregate) {
        (None, Aggregate::Count) => Some("0".to_owned()),
        (acc, _) => acc.map(Decimal::render),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(agg: Aggregate, oid: u32, values: &[Option<&str>]) -> Option<String> {
        let values: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
        combine(agg, oid, &values).unwrap()
    }

    #[test]
    fn sums_counts_and_extremes() {
        assert_eq!(c(Aggregate::Count, INT8, &[Some("3"), Some("4")]).as_deref(), Some("7"));
        assert_eq!(c(Aggregate::Count, INT8, &[]).as_deref(), Some("0"));
        assert_eq!(c(Aggregate::Sum, NUMERIC, &[Some("1.50"), None, Some("-2.125")]).as_deref(), Some("-0.625"));
        assert_eq!(c(Aggregate::Sum, NUMERIC, &[Some("0.05"), Some("0.05")]).as_deref(), Some("0.10"));
        assert_eq!(c(Aggregate::Sum, INT8, &[None, None]), None);
        assert_eq!(c(Aggregate::Min, INT4, &[Some("-5"), Some("3")]).as_deref(), Some("-5"));
        assert_eq!(c(Aggregate::Max, NUMERIC, &[Some("9.9"), Some("10")]).as_deref(), Some("10"));
        assert_eq!(c(Aggregate::Sum, NUMERIC, &[Some("-0.5"), Some("0.25")]).as_deref(), Some("-0.25"));
        assert!(combine(Aggregate::Max, 25, &[Some(b"a")]).is_err(), "text needs the collation");
        assert!(combine(Aggregate::Sum, NUMERIC, &[Some(b"NaN")]).is_err());
    }
}
