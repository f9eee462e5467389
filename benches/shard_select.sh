#!/usr/bin/env bash
# Single-shard SELECT by key through pgrouter against the same SELECT sent straight to a
# shard, measured in one run (pgbench, release build). Starts `pgrouter demo` (a primary, a
# replica and two shard primaries on loopback, database "shop" sharded by
# orders.customer_id), loads ROWS orders through pgrouter (COPY, split between the shards),
# then runs pgbench with `select note from orders where customer_id = :k` for random keys:
#   direct   against shard 0 alone (about half the keys live there; the others miss, which
#            is no dearer for the server, so the ratio errs against pgrouter)
#   pgrouter against database shop, each statement routed to its key's shard
# for -M simple and extended, 1 client (latency) and 8 clients (throughput).
#
#   benches/shard_select.sh            DURATION=10 ROWS=100000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROWS=${ROWS:-100000}

cargo build --release --quiet
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/pgrouter demo --listen "127.0.0.1:$port" >"$work/demo.log" 2>&1 &
demo=$!
cleanup() {
    kill -INT "$demo" 2>/dev/null || true
    wait "$demo" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
    grep -q "Press Ctrl-C" "$work/demo.log" && break
    kill -0 "$demo" 2>/dev/null || { cat "$work/demo.log"; exit 1; }
    sleep 0.5
done
shard0=$(sed -n 's/^ *shard1 *PostgreSQL on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/demo.log")
shard1=$(sed -n 's/^ *shard2 *PostgreSQL on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/demo.log")
proxy="postgresql://app:app-secret@127.0.0.1:$port/shop"
direct="postgresql://app:app-secret@127.0.0.1:$shard0/app"

psql -qX "$proxy" -c "set client_min_messages = warning" -c "drop table if exists orders" -c "create table orders (customer_id bigint primary key, note text)"
seq 1 "$ROWS" | awk '{ print $1 "\tnote " $1 }' | psql -qX "$proxy" -c "\\copy orders from stdin"
for p in "$shard0" "$shard1"; do
    psql -qX "postgresql://app:app-secret@127.0.0.1:$p/app" -c "vacuum analyze orders"
done
printf '\\set k random(1, %d)\nselect note from orders where customer_id = :k;\n' "$ROWS" >"$work/select.sql"

# Prints "tps latency_ms" for one pgbench run.
bench() {
    local url=$1 mode=$2 clients=$3 out
    out=$(pgbench -n -f "$work/select.sql" -M "$mode" -c "$clients" -j "$((clients < 2 ? clients : 2))" -T "$DURATION" "$url" 2>&1) || {
        echo "$out" >&2
        exit 1
    }
    echo "$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out") $(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")"
}

echo "rows: $ROWS ($(psql -qtAX "postgresql://app:app-secret@127.0.0.1:$shard0/app" -c 'select count(*) from orders') on shard 0), ${DURATION} s per run, $(nproc) CPUs"
printf '%-9s %7s %12s %12s %7s %14s %14s %10s\n' mode clients "direct tps" "pgrouter tps" ratio "direct lat ms" "pgrouter lat ms" "added us"
for mode in simple extended; do
    for clients in 1 8; do
        read -r dtps dlat < <(bench "$direct" "$mode" "$clients")
        read -r ptps plat < <(bench "$proxy" "$mode" "$clients")
        awk -v m="$mode" -v c="$clients" -v dt="$dtps" -v pt="$ptps" -v dl="$dlat" -v pl="$plat" 'BEGIN {
            printf "%-9s %7d %12.0f %12.0f %7.2f %14.3f %14.3f %10.0f\n", m, c, dt, pt, pt / dt, dl, pl, (pl - dl) * 1000 }'
    done
done
