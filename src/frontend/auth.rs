//! Client authentication against `[[users]]`: SCRAM-SHA-256 (the default), md5, or trust when
//! configured. The exchanges themselves are the sans-IO state machines in `protocol`; this
//! file only carries their messages over the client's socket.

use std::collections::HashMap;

use crate::config::{AuthMethod, Config, Password, UserConfig};
use crate::error::Error;
use crate::protocol::messages::{auth, password};
use crate::protocol::scram::{self, ScramError, ScramServer, ScramVerifier};
use crate::protocol::{ct_eq, md5};

use super::client::{ClientIo, ClientStream};

/// SCRAM verifiers per user, derived once when the config is loaded so that a login costs
/// the proxy two HMACs rather than a 4096-round PBKDF2.
#[derive(Default)]
pub struct Verifiers(HashMap<String, ScramVerifier>);

impl Verifiers {
    #[must_use]
    pub fn build(config: &Config) -> Self {
        let map = config
            .users
            .iter()
            .filter(|u| u.auth == AuthMethod::ScramSha256)
            .filter_map(|u| {
                let verifier = match u.password.as_ref()? {
                    Password::Plain(p) => ScramVerifier::generate(p),
                    Password::Scram(v) => v.clone(),
                    Password::Md5Hash(_) => return None,
                };
                Some((u.name.clone(), verifier))
            })
            .collect();
        Self(map)
    }
}

/// Runs the exchange `user.auth` names. Does not send AuthenticationOk: the caller does, once
/// it has also checked the database.
pub async fn authenticate<S: ClientIo>(
    client: &mut ClientStream<S>,
    user: &UserConfig,
    verifiers: &Verifiers,
    channel_binding: Option<&[u8]>,
) -> Result<(), Error> {
    let bad_password = || Error::BadPassword { user: user.name.clone() };
    match user.auth {
        AuthMethod::Trust => Ok(()),
        AuthMethod::ScramSha256 => {
            let verifier = verifiers.0.get(&user.name).cloned().ok_or_else(bad_password)?;
            scram_exchange(client, ScramServer::new(verifier), channel_binding).await.map_err(|e| match e {
                AuthFailure::Scram(ScramError::BadProof) => bad_password(),
                AuthFailure::Scram(e) => Error::Protocol(e.to_string()),
                AuthFailure::Other(e) => e,
            })
        }
        AuthMethod::Md5 => {
            let stored = match &user.password {
                Some(Password::Plain(p)) => md5::stored_hash(&user.name, p),
                Some(Password::Md5Hash(h)) => h.clone(),
                _ => return Err(bad_password()),
            };
            let salt: [u8; 4] = rand::random();
            client.send(&auth::md5(salt)).await?;
            let frame = read_password_message(client).await?;
            let answer = password::parse_password(frame.body())
                .ok_or_else(|| Error::Protocol("malformed password message".into()))?;
            if ct_eq(answer, md5::expected_response(&stored, salt).as_bytes()) { Ok(()) } else { Err(bad_password()) }
        }
    }
}

enum AuthFailure {
    Scram(ScramError),
    Other(Error),
}

impl From<Error> for AuthFailure {
    fn from(e: Error) -> Self {
        Self::Other(e)
    }
}

impl From<ScramError> for AuthFailure {
    fn from(e: ScramError) -> Self {
        Self::Scram(e)
    }
}

/// SCRAM-SHA-256, and over TLS also SCRAM-SHA-256-PLUS (channel binding with
/// `tls-server-end-point`, which libpq prefers when it can).
async fn scram_exchange<S: ClientIo>(
    client: &mut ClientStream<S>,
    server: ScramServer,
    channel_binding: Option<&[u8]>,
) -> Result<(), AuthFailure> {
    let offered: &[&str] =
        if channel_binding.is_some() { &[scram::MECHANISM_PLUS, scram::MECHANISM] } else { &[scram::MECHANISM] };
    client.send(&auth::sasl(offered)).await?;
    let first = read_password_message(client).await?;
    let (mechanism, data) = password::parse_sasl_initial(first.body())
        .ok_or_else(|| Error::Protocol("malformed SASLInitialResponse".into()))?;
    if !offered.iter().any(|m| m.as_bytes() == mechanism) {
        return Err(Error::Protocol(format!(
            "client selected SASL mechanism \"{}\", which was not offered",
            String::from_utf8_lossy(mechanism)
        ))
        .into());
    }
    let plus = mechanism == scram::MECHANISM_PLUS.as_bytes();
    let mut server = server.with_channel_binding(channel_binding.map(<[u8]>::to_vec), plus);
    let server_first = server.client_first(data)?;
    client.send(&auth::sasl_continue(&server_first)).await?;
    let last = read_password_message(client).await?;
    let server_final = server.client_final(last.body())?;
    client.send(&auth::sasl_final(&server_final)).await?;
    Ok(())
}

async fn read_password_message<S: ClientIo>(
    client: &mut ClientStream<S>,
) -> Result<crate::protocol::framing::Frame, Error> {
    match client.read_frame().await? {
        Some(frame) if frame.tag() == b'p' => Ok(frame),
        Some(frame) => {
            Err(Error::Protocol(format!("expected a password message, got message type '{}'", char::from(frame.tag()))))
        }
        None => Err(Error::Protocol("client closed the connection during authentication".into())),
    }
}
