//! The client side: accepting connections, login, and the per-client session that relays
//! between a client and the server connections it borrows.
//!
//! This layer decides *when* a client needs a server and *when* it can give it back; it does
//! not know how servers are connected (backend) or how bytes are framed (protocol).

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod client;
pub mod clients;
pub mod flow;
pub mod listener;
pub mod login;
pub mod prepared;
pub mod relay;
pub mod routing;
pub mod session;
pub mod settings;
pub mod tls;

/// A session's own map from statement or portal names: hashed with foldhash (seeded per
/// process) rather than SipHash, which cost more than the rest of an extended-protocol
/// lookup; the maps are per session and bounded, so a client can only slow itself down.
pub type NameMap<V> = std::collections::HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;
