//! PostgreSQL's md5 password exchange (PostgreSQL docs, "Password Authentication"):
//! the client answers a 4-byte salt with `"md5" || md5_hex(md5_hex(password || user) || salt)`.

use md5::{Digest, Md5};

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form: md5_hex(password || user), without the "md5" prefix.
#[must_use]
pub fn stored_hash(user: &str, password: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// What a client must send for this stored hash and salt.
#[must_use]
pub fn expected_response(stored_hash: &str, salt: [u8; 4]) -> String {
    format!("md5{}", md5_hex(&[stored_hash.as_bytes(), &salt]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol_client() {
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        let ours = expected_response(&stored_hash("md5_user", "password"), salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"md5_user", b"password", salt);
        assert_eq!(ours, theirs);
        assert_eq!(ours, "md562af4dd09bbb41884907a838a3233294");
    }

    #[test]
    fn stored_hash_matches_pg_authid() {
        // SELECT 'md5' || md5('secret' || 'alice') in PostgreSQL
        let digest: String = Md5::digest(b"secretalice").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(stored_hash("alice", "secret"), digest);
    }
}
