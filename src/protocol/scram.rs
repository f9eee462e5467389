//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, as a state
//! machine without sockets: feed it the client's messages, send what it returns.
//!
//! pgrouter verifies clients against a stored verifier, either parsed from the
//! `pg_authid`-style string `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` or derived
//! once from a plaintext password at load time. The client side (towards PostgreSQL) is
//! `postgres-protocol`'s `ScramSha256`; this half exists because no maintained crate offers a
//! sans-IO SCRAM server that accepts verifiers.
//!
//! As in PostgreSQL, the user name inside the SCRAM message is ignored: the user is the one
//! named in the startup packet. Channel binding (`-PLUS`) is not offered yet, so a client that
//! asks for it (`p=`) is refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::ct_eq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The same with channel binding (`tls-server-end-point`), offered over TLS.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// What the server stores to check a SCRAM login without knowing the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts), the
    /// format of `pg_authid.rolpassword`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Derives a verifier from a plaintext password, as `CREATE ROLE ... PASSWORD` does.
    #[must_use]
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = hi(&normalize(password), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Derives a verifier with a fresh random salt.
    #[must_use]
    pub fn generate(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }
}

/// SASLprep the password as PostgreSQL does; if it is not valid UTF-8 or SASLprep rejects it,
/// the raw bytes are used (PostgreSQL's `pg_saslprep` fallback).
fn normalize(password: &str) -> Vec<u8> {
    stringprep::saslprep(password).map_or_else(|_| password.as_bytes().to_vec(), |p| p.as_bytes().to_vec())
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// `Hi()` from RFC 5802: PBKDF2 with HMAC-SHA-256 and one output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = Vec::with_capacity(salt.len() + 4);
    block.extend_from_slice(salt);
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut prev = hmac(password, &block);
    let mut out = prev;
    for _ in 1..iterations {
        prev = hmac(password, &prev);
        out.iter_mut().zip(prev).for_each(|(o, p)| *o ^= p);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding was requested but is not offered on this connection")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error("SCRAM message out of order")]
    OutOfOrder,
}

enum State {
    AwaitClientFirst,
    AwaitClientFinal { client_first_bare: String, server_first: String, gs2_header: String, nonce: String },
    Done,
}

/// One SCRAM-SHA-256 exchange with one client.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: State,
    /// `tls-server-end-point` data when the connection is TLS (channel binding offered).
    binding: Option<Vec<u8>>,
    /// The client chose SCRAM-SHA-256-PLUS: it must bind the channel.
    plus: bool,
}

impl ScramServer {
    /// `server_nonce` must be printable ASCII without commas; [`ScramServer::new`] makes one.
    #[must_use]
    pub fn with_nonce(verifier: ScramVerifier, server_nonce: String) -> Self {
        Self { verifier, server_nonce, state: State::AwaitClientFirst, binding: None, plus: false }
    }

    /// Offers channel binding with this connection's `tls-server-end-point` data; `plus` says
    /// the client chose SCRAM-SHA-256-PLUS.
    #[must_use]
    pub fn with_channel_binding(mut self, binding: Option<Vec<u8>>, plus: bool) -> Self {
        self.binding = binding;
        self.plus = plus;
        self
    }

    #[must_use]
    pub fn new(verifier: ScramVerifier) -> Self {
        let raw: [u8; 18] = rand::random();
        Self::with_nonce(verifier, B64.encode(raw))
    }

    /// Takes client-first-message, returns server-first-message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::AwaitClientFirst) {
            return Err(ScramError::OutOfOrder);
        }
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let flag = gs2_header.split(',').next().unwrap_or_default();
        let refuse = |why| Err(ScramError::Malformed(why));
        match (flag, self.binding.is_some(), self.plus) {
            ("n", _, false) | ("y", false, false) | ("p=tls-server-end-point", true, true) => {}
            // the client can bind but believes the server cannot: a downgrade (RFC 5802 §6)
            ("y", true, false) => return refuse("channel binding is offered, but the client says it is not"),
            (f, false, _) if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            (f, true, false) if f.starts_with("p=") => {
                return refuse("channel binding requested without choosing SCRAM-SHA-256-PLUS");
            }
            _ => return refuse("SCRAM-SHA-256-PLUS needs tls-server-end-point channel binding"),
        }
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("client nonce missing"))?;
        if bare.split(',').any(|attr| attr.starts_with("m=")) {
            return Err(ScramError::Malformed("mandatory extensions are not supported"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&self.verifier.salt), self.verifier.iterations);
        self.state = State::AwaitClientFinal {
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            gs2_header: gs2_header.to_owned(),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Takes client-final-message; on a valid proof returns server-final-message.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::AwaitClientFinal { client_first_bare, server_first, gs2_header, nonce } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("proof missing"))?;
        let mut attrs = without_proof.split(',');
        let binding =
            attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(ScramError::Malformed("channel binding missing"))?;
        let final_nonce =
            attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("nonce missing"))?;
        let mut expected = gs2_header.as_bytes().to_vec();
        if gs2_header.starts_with("p=") {
            expected.extend_from_slice(self.binding.as_deref().unwrap_or_default());
        }
        if B64.decode(binding).ok().as_deref() != Some(expected.as_slice()) {
            return Err(ScramError::Malformed("channel binding does not match the first message"));
        }
        if final_nonce != nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 base64-encoded bytes"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key.iter_mut().zip(client_signature).for_each(|(k, s)| *k ^= s);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// Splits `gs2-header` (`n,,` / `y,,` with an optional `a=authzid`) from client-first-bare.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), ScramError> {
    let cb_flag = msg.split(',').next().unwrap_or_default();
    if !(matches!(cb_flag, "n" | "y") || cb_flag.starts_with("p=")) {
        return Err(ScramError::Malformed("bad channel binding flag"));
    }
    let second_comma =
        msg.match_indices(',').nth(1).map(|(i, _)| i).ok_or(ScramError::Malformed("gs2 header incomplete"))?;
    let (header, bare) = msg.split_at(second_comma + 1);
    if header.len() != cb_flag.len() + 2 {
        // PostgreSQL refuses an authorization identity (`a=...`) too.
        return Err(ScramError::Malformed("authorization identities are not supported"));
    }
    Ok((header, bare))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3: user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str =
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramVerifier {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramVerifier::from_password("pencil", &salt, 4096)
    }

    #[test]
    fn rfc7677_vector() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), SERVER_NONCE.into());
        assert_eq!(server.client_first(CLIENT_FIRST.as_bytes()).unwrap(), SERVER_FIRST.as_bytes());
        assert_eq!(server.client_final(CLIENT_FINAL.as_bytes()).unwrap(), SERVER_FINAL.as_bytes());
    }

    #[test]
    fn wrong_proof_is_refused() {
        let wrong = ScramVerifier::from_password("pencil2", &rfc_verifier().salt, 4096);
        let mut server = ScramServer::with_nonce(wrong, SERVER_NONCE.into());
        server.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(server.client_final(CLIENT_FINAL.as_bytes()), Err(ScramError::BadProof));
    }

    #[test]
    fn verifier_string_round_trip() {
        let v = rfc_verifier();
        let s = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            B64.encode(&v.salt),
            B64.encode(v.stored_key),
            B64.encode(v.server_key)
        );
        assert!(ScramVerifier::parse(&s) == Some(v));
        assert!(ScramVerifier::parse("SCRAM-SHA-256$x:abc$def").is_none());
    }

    #[test]
    fn verifier_from_postgres_protocol_is_accepted() {
        // The same derivation PostgreSQL uses, as implemented by rust-postgres.
        let s = postgres_protocol::password::scram_sha_256(b"s3cret");
        let v = ScramVerifier::parse(&s).unwrap();
        assert!(v == ScramVerifier::from_password("s3cret", &v.salt, v.iterations));
    }

    #[test]
    fn postgres_protocol_client_logs_in() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut server = ScramServer::new(ScramVerifier::generate("hunter2"));
        let mut client = ScramSha256::new(b"hunter2", ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        let last = server.client_final(client.message()).unwrap();
        client.finish(&last).unwrap();
    }

    #[test]
    fn channel_binding_with_plus() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let end_point = vec![7u8; 32];
        let exchange = |client_sees: Vec<u8>, plus: bool, server_binds: bool| {
            let bound = if server_binds { Some(end_point.clone()) } else { None };
            let mut server = ScramServer::new(ScramVerifier::generate("hunter2")).with_channel_binding(bound, plus);
            let binding =
                if plus { ChannelBinding::tls_server_end_point(client_sees) } else { ChannelBinding::unrequested() };
            let mut client = ScramSha256::new(b"hunter2", binding);
            let first = server.client_first(client.message())?;
            client.update(&first).map_err(|_| ScramError::BadProof)?;
            let last = server.client_final(client.message())?;
            client.finish(&last).map_err(|_| ScramError::BadProof)
        };
        assert_eq!(exchange(end_point.clone(), true, true), Ok(()), "SCRAM-SHA-256-PLUS with the right data");
        assert!(exchange(vec![8u8; 32], true, true).is_err(), "another certificate's hash (a man in the middle)");
        // "y": the client could bind but thinks the server cannot; over TLS that is a downgrade
        assert!(exchange(Vec::new(), false, true).is_err());
        assert_eq!(exchange(Vec::new(), false, false), Ok(()), "without TLS, y is fine");
    }

    #[test]
    fn channel_binding_requests_are_refused() {
        let mut server = ScramServer::new(rfc_verifier());
        let msg = "p=tls-server-end-point,,n=,r=abc";
        assert_eq!(server.client_first(msg.as_bytes()), Err(ScramError::ChannelBinding));
    }

    #[test]
    fn authorization_identity_is_refused() {
        let mut server = ScramServer::new(rfc_verifier());
        assert!(matches!(server.client_first(b"n,a=admin,n=,r=abc"), Err(ScramError::Malformed(_))));
    }

    #[test]
    fn messages_out_of_order() {
        let mut server = ScramServer::new(rfc_verifier());
        assert_eq!(server.client_final(CLIENT_FINAL.as_bytes()), Err(ScramError::OutOfOrder));
    }
}
