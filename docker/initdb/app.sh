#!/bin/sh
# Runs once on the primary and on each shard: the role pgrouter logs in as, owning the
# database "app".
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE app WITH LOGIN PASSWORD 'app-secret';
CREATE DATABASE app OWNER app;
SQL
