//! pgrouter: a PostgreSQL wire-protocol routing proxy.
//!
//! # Layout
//!
//! Modules are layered by protocol altitude; imports point down only.
//!
//! - [`app`]: builds the shared handles, starts the listener and pool upkeep, handles signals.
//! - [`frontend`]: client side: listener, login and auth, the per-client session and relay,
//!   cancel keys.
//! - [`backend`]: server side: connections to PostgreSQL and the pools that lend them.
//! - [`router`]: where a statement goes ([`router::Route`]: shard and role).
//! - [`sharding`]: shard keys and where each sharded table's rows live (PostgreSQL-compatible
//!   hash, range, list).
//! - [`protocol`]: sans-IO wire protocol: framing, startup packet, message views and
//!   builders, SCRAM and md5.
//! - [`config`]: load, validate (every error with its path), immutable snapshot.
//! - [`error`]: the error type, with the SQLSTATE each error shows to clients.
//! - [`timer`]: sleeps and timeouts on the reactor (the runtime has no tokio time driver).
//! - [`cluster`]: local PostgreSQL clusters for `pgrouter demo` and the integration tests.
//! - [`cli`]: the command-line entry points behind `main`; [`demo`]: `pgrouter demo`.

pub mod app;
pub mod backend;
pub mod cli;
pub mod cluster;
pub mod telemetry;

pub mod config;
pub mod demo;
pub mod error;
pub mod frontend;
pub mod protocol;
pub mod router;
pub mod sharding;
pub mod timer;
