//! PostgreSQL's hash partitioning, reproduced bit for bit, so that `scheme = "hash"` puts a
//! key on the shard index PostgreSQL's `PARTITION BY HASH (key)` with `MODULUS <shards>` puts
//! it in `REMAINDER <index>`.
//!
//! Where this comes from in the PostgreSQL 15 sources:
//! - `src/backend/partitioning/partbounds.c`, `compute_partition_hash_value`: every non-null
//!   key column's extended hash, called with seed `HASH_PARTITION_SEED`, is folded into a
//!   64-bit row hash with `hash_combine64` (starting from 0); the partition is the row hash
//!   modulo the modulus (`get_partition_for_tuple`).
//! - `src/include/common/hashfn.h`: `hash_combine64`.
//! - `src/common/hashfn.c`: `hash_bytes_extended` (Bob Jenkins' lookup3 with the 64-bit seed
//!   mixed into the initial state; the result is `b << 32 | c`) and
//!   `hash_bytes_uint32_extended`.
//! - `src/backend/access/hash/hashfunc.c` and `src/backend/utils/adt/uuid.c`: the per-type
//!   functions `hashint4extended`, `hashint8extended` (folds the high half into the low half
//!   so an int8 hashes like the int4 of the same value), `hashtextextended` (the bytes, for
//!   deterministic collations) and `uuid_hash_extended` (the 16 bytes).
//!
//! The byte order is little-endian, as on the x86-64 and ARM64 servers PostgreSQL runs on:
//! lookup3 reads its input in 32-bit words in the machine's order, so a big-endian server
//! would place text and uuid keys differently.

/// `HASH_PARTITION_SEED` (partition.h).
const PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// lookup3's `mix()`.
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3's `final()`.
fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The initial state, perturbed by the seed as if it were a leading 12-byte chunk.
fn seeded(len: u32, seed: u64) -> (u32, u32, u32) {
    let init = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// `hash_bytes_extended`.
#[must_use]
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let (mut a, mut b, mut c) = seeded(len, seed);
    let word = |k: &[u8]| u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
    let mut k = key;
    while k.len() >= 12 {
        a = a.wrapping_add(word(&k[0..4]));
        b = b.wrapping_add(word(&k[4..8]));
        c = c.wrapping_add(word(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // the last 0..=11 bytes; the lowest byte of c is left for the length
    let byte = |i: usize, shift: u32| k.get(i).map_or(0, |&v| u32::from(v) << shift);
    c = c.wrapping_add(byte(10, 24) + byte(9, 16) + byte(8, 8));
    b = b.wrapping_add(byte(7, 24) + byte(6, 16) + byte(5, 8) + byte(4, 0));
    a = a.wrapping_add(byte(3, 24) + byte(2, 16) + byte(1, 8) + byte(0, 0));
    finish(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_uint32_extended`.
#[must_use]
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = seeded(4, seed);
    a = a.wrapping_add(k);
    finish(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_combine64`.
#[must_use]
fn combine64(a: u64, b: u64) -> u64 {
    a ^ b.wrapping_add(0x49a0_f4dd_15e5_a8e3).wrapping_add(a << 54).wrapping_add(a >> 7)
}

/// A single-column partition key's row hash, from its type's extended hash.
fn row_hash(column_hash: u64) -> u64 {
    combine64(0, column_hash)
}

/// `hashint4extended`.
#[must_use]
pub fn int4(v: i32) -> u64 {
    row_hash(hash_uint32_extended(v as u32, PARTITION_SEED))
}

/// `hashint8extended`: the high half folded into the low half (inverted for negative values),
/// so every int8 hashes like the int4 of the same value.
#[must_use]
pub fn int8(v: i64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = lo ^ if v >= 0 { hi } else { !hi };
    row_hash(hash_uint32_extended(folded, PARTITION_SEED))
}

/// `hashtextextended` under a deterministic collation: the string's bytes.
#[must_use]
pub fn text(v: &[u8]) -> u64 {
    row_hash(hash_bytes_extended(v, PARTITION_SEED))
}

/// `uuid_hash_extended`: the 16 bytes.
#[must_use]
pub fn uuid(v: &[u8; 16]) -> u64 {
    row_hash(hash_bytes_extended(v, PARTITION_SEED))
}

/// The remainder (shard index) a row hash falls in for `modulus` partitions.
#[must_use]
pub fn remainder(row_hash: u64, modulus: usize) -> usize {
    // modulus >= 1 (a database has at least one shard); usize fits in u64 on every target
    (row_hash % modulus.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_hashes_like_int4_in_int4_range() {
        for v in [0i32, 1, -1, 42, i32::MIN, i32::MAX, 123_456] {
            assert_eq!(int8(i64::from(v)), int4(v), "{v}");
        }
    }

    #[test]
    fn the_tail_of_a_key_counts_byte_by_byte() {
        let key = b"abcdefghijklmnopqrstuvw";
        let hashes: std::collections::HashSet<u64> = (0..=key.len()).map(|n| text(&key[..n])).collect();
        assert_eq!(hashes.len(), key.len() + 1, "every prefix length hashes differently");
    }
}
