//! Where a statement goes (DESIGN §4): hints first, then the config's rules, then the
//! classification of the statement (cached by its shape). The result is a [`Decision`]: a
//! role (primary or replica) on a shard, with the reason, which `pgrouter explain` prints.
//!
//! This module decides from text and config only. Which replica serves a read (health, lag,
//! read-your-writes, load balancing) is the backend's business; transactions are the
//! session's.

pub mod classify;
pub mod copy;
pub mod explain;
pub mod hint;
pub mod keys;
pub mod policy;
pub mod shape;
pub mod sharded;

pub use policy::{Decision, Policy, Target, Why};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use classify::{Classification, classify};
use shape::Shape;

/// Classifies statements, remembering each shape's classification in a bounded cache shared
/// by all sessions (sharded, so lookups do not contend on one lock).
pub struct Router {
    cache: quick_cache::sync::Cache<Box<[u8]>, Arc<Classification>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl Router {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { cache: quick_cache::sync::Cache::new(capacity), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The classification of `sql`, from the cache when its shape was seen before. `scratch`
    /// is kept by the caller so that a hit allocates nothing; afterwards it holds the shape
    /// and the positions of the text's literals (where shard-key values are read from).
    pub fn classify(&self, sql: &[u8], scratch: &mut Shape) -> Arc<Classification> {
        scratch.of(sql);
        self.classify_shaped(sql, scratch)
    }

    /// [`Router::classify`] for a `sql` whose shape `shape` is already.
    pub fn classify_shaped(&self, sql: &[u8], shape: &Shape) -> Arc<Classification> {
        if let Some(hit) = self.cache.get(shape.text.as_slice()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let class = Arc::new(match std::str::from_utf8(sql) {
            Ok(text) => classify(text, &shape.literals),
            Err(_) => classify::Classification::unparsable("the text is not valid UTF-8"),
        });
        if class.cacheable {
            self.cache.insert(shape.text.as_slice().into(), Arc::clone(&class));
        }
        class
    }

    /// Counts a classification the caller knew without the cache: a statement of the shape
    /// it classified last (see `Shape::relit`).
    pub fn count_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// The cached shapes with their classifications (SHOW ROUTES).
    pub fn shapes(&self) -> impl Iterator<Item = (Box<[u8]>, Arc<Classification>)> + '_ {
        self.cache.iter()
    }
}

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
        Self { shard, role: Role::Primary }
    }
}
