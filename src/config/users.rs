//! The `[[users]]` section: who may log in to pgrouter, how, and with which credentials the
//! proxy logs in to the backends on their behalf.

use std::fmt;

use super::ConfigError;
use super::reader::{Errors, FromToml, Section, toml_enum};
use crate::protocol::scram::ScramVerifier;

toml_enum!(
    /// How a client proves who it is. `trust` accepts anyone who names the user: only for
    /// closed networks, and only when configured.
    AuthMethod { ScramSha256 => "scram-sha-256", Md5 => "md5", Trust => "trust" }
);

/// A stored password, in one of the forms `pg_authid.rolpassword` uses.
#[derive(Clone)]
pub enum Password {
    Plain(String),
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    Scram(ScramVerifier),
    /// `md5` followed by md5_hex(password || username)
    Md5Hash(String),
}

impl Password {
    #[must_use]
    pub fn plaintext(&self) -> Option<&str> {
        match self {
            Self::Plain(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a secret, not even in debug output.
        match self {
            Self::Plain(_) => f.write_str("Password::Plain(****)"),
            Self::Scram(_) => f.write_str("Password::Scram(****)"),
            Self::Md5Hash(_) => f.write_str("Password::Md5Hash(****)"),
        }
    }
}

impl FromToml for Password {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        let s = String::from_toml(v)?;
        if s.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(&s)
                .map(Password::Scram)
                .ok_or_else(|| "looks like a SCRAM-SHA-256 verifier but is malformed".to_owned());
        }
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Password::Md5Hash(s[3..].to_ascii_lowercase()));
        }
        Ok(Password::Plain(s))
    }
}

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub password: Option<Password>,
    pub auth: AuthMethod,
    /// The role used on the backends (default: `name`).
    pub server_user: String,
    /// The password used on the backends (default: `password` when it is plaintext).
    pub server_password: Option<String>,
}

pub(super) fn read(sections: Vec<Section<'_>>, errs: &mut Errors) -> Vec<UserConfig> {
    let mut users: Vec<UserConfig> = Vec::new();
    for mut s in sections {
        let name: Option<String> = s.req("name", errs);
        let password: Option<Password> = s.opt("password", errs);
        let auth = s.or("auth", AuthMethod::ScramSha256, errs);
        let server_user: Option<String> = s.opt("server_user", errs);
        let server_password: Option<String> = s.opt("server_password", errs);
        let Some(name) = name else {
            s.finish(errs);
            continue;
        };
        if name.is_empty() {
            errs.push(ConfigError::new(s.key_path("name"), "must not be empty"));
        }
        if users.iter().any(|u| u.name == name) {
            errs.push(ConfigError::new(s.key_path("name"), format!("user \"{name}\" is listed twice")));
        }
        check_password(&s, auth, password.as_ref(), errs);
        let server_password =
            server_password.or_else(|| password.as_ref().and_then(Password::plaintext).map(str::to_owned));
        users.push(UserConfig {
            server_user: server_user.unwrap_or_else(|| name.clone()),
            name,
            password,
            auth,
            server_password,
        });
        s.finish(errs);
    }
    users
}

fn check_password(s: &Section<'_>, auth: AuthMethod, password: Option<&Password>, errs: &mut Errors) {
    let at = s.key_path("password");
    match (auth, password) {
        (AuthMethod::Trust, _) => {}
        (_, None) => errs.push(ConfigError::new(at, format!("is required when auth = \"{auth}\""))),
        (AuthMethod::Md5, Some(Password::Scram(_))) => errs
            .push(ConfigError::new(at, "a SCRAM verifier cannot check md5 logins; store the plaintext or an md5 hash")),
        (AuthMethod::ScramSha256, Some(Password::Md5Hash(_))) => errs.push(ConfigError::new(
            at,
            "an md5 hash cannot check SCRAM-SHA-256 logins; store the plaintext or a SCRAM verifier",
        )),
        _ => {}
    }
}
