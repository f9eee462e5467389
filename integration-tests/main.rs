//! Integration tests: real PostgreSQL servers, the real pgrouter binary, real clients
//! (tokio-postgres, psql, pgbench). See `harness` for how environments are built.

mod harness;

mod auth;
mod cli;
mod differential;
mod driver_matrix;
mod faults;
mod lifecycle;
mod operations;
mod pooling;
mod psql;
mod routing;
mod security;
mod sharding;
mod sharding_copy;
mod topology;
mod transparency;
