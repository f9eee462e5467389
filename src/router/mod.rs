//! Where a statement goes. The [`Route`] names a shard and a role; the read/write classifier,
//! hints, rules and shard-key extraction that choose it arrive with the routing and sharding
//! work (DESIGN §4–§5). Until then every statement goes to the primary of the first shard.

use std::fmt;

/// Index of a shard in `[[databases.shards]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which server of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

/// The server a statement (or a whole transaction) is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub shard: ShardId,
    pub role: Role,
}

impl Route {
    #[must_use]
    pub fn primary(shard: ShardId) -> Self {
        Self {
            shard,
            role: Role::Primary,
        }
    }
}
