//! The PostgreSQL frontend/backend protocol, sans IO: framing, the startup packet, the few
//! message views and builders the proxy needs, and the authentication state machines.
//!
//! Nothing here touches a socket, a clock or the config; everything is unit-tested with bytes.

pub mod framing;
pub mod md5;
pub mod messages;
pub mod scan;
pub mod scram;
pub mod startup;

/// Compares two byte strings in time that depends only on their lengths, for secrets.
#[must_use]
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
