#!/bin/sh
# Runs once, when the primary's data directory is created: a role for the streaming
# replica, allowed to connect for replication, and the application's role.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator-secret';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
