//! The errors pgrouter reports, each knowing which side caused it and the SQLSTATE a client
//! should see (DESIGN §7).
//!
//! Errors the proxy itself raises are turned into an ErrorResponse with a real SQLSTATE and a
//! message a person understands. `58000`-class codes are reserved for true internal errors; a
//! backend that cannot be reached is `08006`, a waiting client that gave up is `53000`, a bad
//! password is `28P01`.

use std::time::Duration;

use crate::protocol::framing::FrameError;

/// A five-character SQLSTATE code, as listed in PostgreSQL's "Appendix A. Error Codes".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    pub const CONNECTION_FAILURE: Self = Self("08006");
    pub const INVALID_AUTHORIZATION: Self = Self("28000");
    pub const INVALID_PASSWORD: Self = Self("28P01");
    pub const INVALID_CATALOG_NAME: Self = Self("3D000");
    pub const INSUFFICIENT_RESOURCES: Self = Self("53000");
    pub const TOO_MANY_CONNECTIONS: Self = Self("53300");
    pub const PROGRAM_LIMIT_EXCEEDED: Self = Self("54000");
    pub const ADMIN_SHUTDOWN: Self = Self("57P01");
    pub const FEATURE_NOT_SUPPORTED: Self = Self("0A000");
    pub const INTERNAL_ERROR: Self = Self("XX000");
    pub const SYSTEM_ERROR: Self = Self("58000");
}

/// Which side of the proxy an error came from: the client (frontend), a PostgreSQL server
/// (backend), or pgrouter itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Frontend,
    Backend,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("protocol violation: {0}")]
    Protocol(String),

    #[error("{0}")]
    Frame(#[from] FrameError),

    #[error("password authentication failed for user \"{user}\"")]
    BadPassword { user: String },

    #[error("{0}")]
    Unauthorized(String),

    #[error("database \"{0}\" does not exist in pgrouter's configuration")]
    UnknownDatabase(String),

    #[error("{0}")]
    NotSupported(String),

    /// A routing hint or pgrouter setting with a bad value.
    #[error("{0}")]
    Invalid(String),

    #[error("no replica available for database \"{database}\" shard {shard}: {report}")]
    NoReplica { database: String, shard: usize, report: String },

    #[error("refusing to send a write to {server}: it reports that it is in recovery (a standby)")]
    PrimaryInRecovery { server: String },

    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    TransactionAborted,

    #[error("could not start the transaction on {server}: {reason}")]
    TransactionStart { server: String, reason: String },

    #[error(
        "pool {pool} is busy: waited {} for a server connection (query_wait_timeout)",
        humantime::format_duration(*waited)
    )]
    PoolTimeout { pool: String, waited: Duration },

    #[error("could not connect to server {server}: {reason}")]
    Connect { server: String, reason: String },

    #[error("lost the connection to server {server}: {reason}")]
    ServerLost { server: String, reason: String },

    #[error("server {server} sent an unexpected message: {what}")]
    ServerProtocol { server: String, what: String },

    #[error("pgrouter is shutting down")]
    Shutdown,

    #[error("client connection: {0}")]
    ClientIo(#[source] std::io::Error),

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The SQLSTATE a client sees for this error.
    #[must_use]
    pub fn sqlstate(&self) -> SqlState {
        match self {
            Self::Protocol(_) | Self::ServerProtocol { .. } => SqlState::PROTOCOL_VIOLATION,
            Self::Frame(FrameError::TooLarge { .. }) => SqlState::PROGRAM_LIMIT_EXCEEDED,
            Self::Frame(_) => SqlState::PROTOCOL_VIOLATION,
            Self::BadPassword { .. } => SqlState::INVALID_PASSWORD,
            Self::Unauthorized(_) => SqlState::INVALID_AUTHORIZATION,
            Self::UnknownDatabase(_) => SqlState::INVALID_CATALOG_NAME,
            Self::NotSupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            Self::Invalid(_) => SqlState("22023"),
            Self::NoReplica { .. } => SqlState::CONNECTION_FAILURE,
            Self::PrimaryInRecovery { .. } => SqlState("25006"),
            Self::TransactionStart { .. } => SqlState("25000"),
            Self::TransactionAborted => SqlState("25P02"),
            Self::PoolTimeout { .. } => SqlState::INSUFFICIENT_RESOURCES,
            Self::Connect { .. } | Self::ServerLost { .. } => SqlState::CONNECTION_FAILURE,
            Self::Shutdown => SqlState::ADMIN_SHUTDOWN,
            Self::ClientIo(_) => SqlState::CONNECTION_FAILURE,
            Self::Internal(_) => SqlState::INTERNAL_ERROR,
        }
    }

    /// Which side caused the error.
    #[must_use]
    pub fn side(&self) -> Side {
        match self {
            Self::Protocol(_)
            | Self::Frame(_)
            | Self::BadPassword { .. }
            | Self::Unauthorized(_)
            | Self::UnknownDatabase(_)
            | Self::NotSupported(_)
            | Self::Invalid(_)
            | Self::TransactionAborted
            | Self::ClientIo(_) => Side::Frontend,
            Self::Connect { .. }
            | Self::ServerLost { .. }
            | Self::ServerProtocol { .. }
            | Self::NoReplica { .. }
            | Self::PrimaryInRecovery { .. }
            | Self::TransactionStart { .. } => Side::Backend,
            Self::PoolTimeout { .. } | Self::Shutdown | Self::Internal(_) => Side::Internal,
        }
    }

    /// Whether the client may simply retry the same statement later.
    #[must_use]
    pub fn retryable(&self) -> bool {
        matches!(self, Self::PoolTimeout { .. } | Self::Connect { .. } | Self::Shutdown | Self::NoReplica { .. })
    }

    /// A short stable name for logs and the `pgrouter_errors_total{kind}` metric.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Protocol(_) | Self::Frame(_) => "client_protocol",
            Self::BadPassword { .. } | Self::Unauthorized(_) => "auth",
            Self::UnknownDatabase(_) => "unknown_database",
            Self::NotSupported(_) => "not_supported",
            Self::Invalid(_) => "invalid_setting",
            Self::NoReplica { .. } => "no_replica",
            Self::PrimaryInRecovery { .. } => "primary_in_recovery",
            Self::TransactionStart { .. } => "transaction_start",
            Self::TransactionAborted => "transaction_aborted",
            Self::PoolTimeout { .. } => "pool_timeout",
            Self::Connect { .. } => "server_connect",
            Self::ServerLost { .. } => "server_lost",
            Self::ServerProtocol { .. } => "server_protocol",
            Self::Shutdown => "shutdown",
            Self::ClientIo(_) => "client_io",
            Self::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
