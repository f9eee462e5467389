#!/usr/bin/env bash
# pgbench against direct PostgreSQL, pgrouter and PgBouncer, in turn, in one run.
#
# Starts one PostgreSQL 15 server on loopback (pgbench scale SCALE), pgrouter (release build)
# and, when installed (`apt-get install pgbouncer`), PgBouncer, both in transaction mode with
# the same pool size (POOL) and both authenticating clients with SCRAM-SHA-256. pgrouter runs
# with its parser and routing on: every statement is shaped, classified (cache) and routed.
# Then it runs pgbench -S (the built-in select-only script), ROUNDS times DURATION seconds per
# target and cell, the targets taking turns:
#   -M simple, extended, prepared   with 1 client (latency) and 32 clients (throughput)
#   -C (a new connection per transaction), -M simple, 1 and 32 clients, once with SCRAM-SHA-256
#      and once with md5 (user app_md5, md5 on all three): with SCRAM the client's own PBKDF2
#      (about 3 ms in libpq here) is part of every connection, whoever is behind the port
# and prints, per cell and target, the median over the rounds of: TPS, the median and mean
# latency (from pgbench's per-transaction log), and the proxy's CPU seconds per 1,000 queries
# (utime + stime from /proc/<pid>/stat); with the ratio of TPS to direct, the latency added
# over direct and the lowest and highest TPS of the rounds. Under each cell, pgrouter's TPS
# over PgBouncer's in each round (the two ran seconds apart) and the median of those ratios.
# Last, IDLE (10,000) clients log in to pgrouter and stay idle while its resident memory is
# read (benches/idle_clients.py).
#
#   benches/compare.sh                 DURATION=5 ROUNDS=3 SCALE=10 POOL=16 CLIENTS="1 32" WORKERS=1
#                                      (ROUNDS runs of DURATION seconds per target and cell, the
#                                      targets taking turns; medians shown. WORKERS is
#                                      pgrouter's `workers`: 1 thread, as PgBouncer has)
#   MODES="simple" CLIENTS=32 benches/compare.sh       a subset
#   CONNECT=0 benches/compare.sh                        skip the -C cells
#   IDLE=0 benches/compare.sh                           skip the idle clients
#   BARE=1 benches/compare.sh            also run the -S cells through examples/bare_relay.rs
#                                        (target "bare"): a tokio relay that only copies bytes,
#                                        one server connection per client, no parsing or pool;
#                                        the floor for any proxy on tokio's current-thread runtime
#   HOLD=1 benches/compare.sh            start everything, print the addresses and pids, and
#                                        wait (for profiling by hand) until Ctrl-C
#   PERF=/tmp/prof benches/compare.sh    record pgrouter with `perf record` during each of its
#                                        runs, into /tmp/prof-<mode>-<clients>-<connect>.data
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
POOL=${POOL:-16}
WORKERS=${WORKERS:-1}
CLIENTS=${CLIENTS:-1 32}
MODES=${MODES:-simple extended prepared}
CONNECT=${CONNECT:-1}
PERF=${PERF:-}
BARE=${BARE:-0}
IDLE=${IDLE:-10000}
# the idle clients need a descriptor each, in pgrouter and in the script holding them
ulimit -n $((IDLE + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet
[ "$BARE" = 1 ] && cargo build --release --quiet --example bare_relay
bindir=$(pg_config --bindir)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# PostgreSQL and PgBouncer refuse to run as root: run them as the postgres OS user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    [ -f "$work/data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

# --- PostgreSQL ---------------------------------------------------------------------------
pg_port=$(free_port)
mkdir "$work/data" "$work/run"
[ "$(id -u)" = 0 ] && chown postgres "$work/data" "$work/run"
as_pg "$bindir/initdb" -D "$work/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --no-sync -E UTF8 --locale=C >"$work/initdb.log"
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/run'
max_connections = 200
shared_buffers = '256MB'
fsync = off
synchronous_commit = off
EOF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/run/postgres.log" -w start >/dev/null
cat >"$work/data/pg_hba.conf" <<EOF
local all all trust
host all app_md5 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
EOF
as_pg psql -qX -h "$work/run" -p "$pg_port" -U postgres -d postgres \
    -c "create role app login password 'app-secret'" -c "create database app owner app" \
    -c "set password_encryption = 'md5'" -c "create role app_md5 login password 'app-secret'" \
    -c "select pg_reload_conf()" >/dev/null
direct="postgresql://app:app-secret@127.0.0.1:$pg_port/app"
pgbench -q -i -s "$SCALE" "$direct" >"$work/init.log" 2>&1
psql -qX "$direct" -c "grant select on all tables in schema public to app_md5"

# --- pgrouter -----------------------------------------------------------------------------
pr_port=$(free_port)
cat >"$work/pgrouter.toml" <<EOF
[proxy]
listen = "127.0.0.1:$pr_port"
workers = $WORKERS
max_client_connections = 10000

[[users]]
name = "app"
password = "app-secret"

[[users]]
name = "app_md5"
password = "app-secret"
auth = "md5"

[[databases]]
name = "app"
pool_mode = "transaction"
pool_size = $POOL

[[databases.shards]]
primary = "127.0.0.1:$pg_port"
EOF
target/release/pgrouter --config "$work/pgrouter.toml" >"$work/pgrouter.log" 2>&1 &
pgrouter_pid=$!
pids+=("$pgrouter_pid")

# --- PgBouncer ----------------------------------------------------------------------------
pgbouncer_pid=
if command -v pgbouncer >/dev/null; then
    pb_port=$(free_port)
    printf '"app" "app-secret"\n"app_md5" "app-secret"\n' >"$work/userlist.txt"
    printf 'host all app_md5 127.0.0.1/32 md5\nhost all app 127.0.0.1/32 scram-sha-256\n' >"$work/pgbouncer_hba.conf"
    cat >"$work/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pb_port
unix_socket_dir =
auth_type = hba
auth_hba_file = $work/pgbouncer_hba.conf
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 10000
logfile = $work/run/pgbouncer.log
pidfile = $work/run/pgbouncer.pid
EOF
    chmod 644 "$work/userlist.txt" "$work/pgbouncer.ini" "$work/pgbouncer_hba.conf"
    as_pg pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 &
    for _ in $(seq 1 50); do [ -s "$work/run/pgbouncer.pid" ] && break; sleep 0.1; done
    pgbouncer_pid=$(cat "$work/run/pgbouncer.pid")
    pids+=("$pgbouncer_pid")
fi

for _ in $(seq 1 100); do psql -qtAX "postgresql://app:app-secret@127.0.0.1:$pr_port/app" -c 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
targets=(direct pgrouter)
declare -A url=([direct]=$direct [pgrouter]="postgresql://app:app-secret@127.0.0.1:$pr_port/app")
declare -A pid=([direct]= [pgrouter]=$pgrouter_pid)
if [ -n "$pgbouncer_pid" ]; then
    targets+=(pgbouncer)
    url[pgbouncer]="postgresql://app:app-secret@127.0.0.1:$pb_port/app"
    pid[pgbouncer]=$pgbouncer_pid
fi
if [ "$BARE" = 1 ]; then
    br_port=$(free_port)
    target/release/examples/bare_relay "127.0.0.1:$br_port" "127.0.0.1:$pg_port" >"$work/bare.log" 2>&1 &
    pids+=("$!")
    targets+=(bare)
    url[bare]="postgresql://app:app-secret@127.0.0.1:$br_port/app"
    pid[bare]=$!
    for _ in $(seq 1 100); do psql -qtAX "${url[bare]}" -c 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
fi

if [ -n "${HOLD:-}" ]; then
    for target in "${targets[@]}"; do echo "$target ${url[$target]} pid ${pid[$target]:-}"; done
    sleep infinity &
    wait $! || true
    exit 0
fi

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# One pgbench run; prints "tps median_ms mean_ms cpu_s_per_1000_queries" (cpu "-" for direct).
# connect: 0, or the authentication of a -C run (scram or md5).
bench() {
    local target=$1 mode=$2 clients=$3 connect=$4 out before=0 after=0 logdir url=${url[$1]}
    logdir="$work/log-$target-$mode-$clients-$connect"
    mkdir "$logdir"
    local args=(-n -S -M "$mode" -c "$clients" -j "$((clients < 2 ? clients : 2))" -T "$DURATION" -l --log-prefix "$logdir/tx")
    [ "$connect" != 0 ] && args+=(-C)
    [ "$connect" = md5 ] && url=${url/app:app-secret/app_md5:app-secret}
    local perf=
    if [ -n "$PERF" ] && [ "$target" = pgrouter ]; then
        perf record -q -F 1999 --call-graph dwarf,32768 -o "$PERF-$mode-$clients-$connect.data" -p "${pid[$target]}" 2>/dev/null &
        perf=$!
    fi
    [ -n "${pid[$target]}" ] && before=$(cpu_ticks "${pid[$target]}")
    out=$(pgbench "${args[@]}" "$url" 2>&1) || {
        # PgBouncer before 1.21 cannot keep prepared statements in transaction mode
        echo "$target, -M $mode, $clients clients: pgbench failed: $(grep -m1 'ERROR' <<<"$out" || tail -1 <<<"$out")" >&2
        rm -rf "$logdir"
        echo "failed - - -"
        return
    }
    [ -n "${pid[$target]}" ] && after=$(cpu_ticks "${pid[$target]}")
    [ -n "$perf" ] && { kill -INT "$perf"; wait "$perf" || true; }
    local tps queries median mean cpu=-
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    queries=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    read -r median mean < <(cat "$logdir"/tx* | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1; s += $1 } END { printf "%.3f %.3f\n", v[int((NR + 1) / 2)] / 1000, s / NR / 1000 }')
    [ -n "${pid[$target]}" ] && cpu=$(awk -v t="$((after - before))" -v hz="$ticks" -v q="$queries" 'BEGIN { printf "%.4f", t / hz / q * 1000 }')
    rm -rf "$logdir"
    echo "$tps $median $mean $cpu"
}

cells=()
for mode in $MODES; do for clients in $CLIENTS; do cells+=("$mode $clients 0"); done; done
[ "$CONNECT" = 1 ] && for auth in scram md5; do for clients in $CLIENTS; do cells+=("simple $clients $auth"); done; done

echo "pgbench -S, scale $SCALE, $ROUNDS rounds of ${DURATION} s per target and cell (medians shown), pool $POOL (transaction mode), $(nproc) CPUs, pgrouter workers = $WORKERS, $(pgbouncer --version 2>/dev/null | head -1 || echo 'no PgBouncer')"
printf '%-10s %7s %-9s %10s %7s %10s %9s %11s %11s  %s\n' mode clients target tps ratio "median ms" "mean ms" "added us" "cpu s/1k q" "tps range"
# the median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for cell in "${cells[@]}"; do
    read -r mode clients connect <<<"$cell"
    label=$mode
    [ "$connect" != 0 ] && label="-C $connect"
    # the targets take turns, round after round, so that a noisy minute on this shared
    # machine falls on all of them rather than on whichever ran then; each round starts one
    # target further on, so none always runs right after the same other one (the direct
    # run's 32 backends, say, exiting while the next target starts)
    declare -A runs=()
    cell_targets=("${targets[@]}")
    # the bare relay has no pool: a -C run through it is a direct run with one more hop
    [ "$connect" != 0 ] && cell_targets=(${targets[@]/bare/})
    for round in $(seq 0 $((ROUNDS - 1))); do
        first=$((round % ${#cell_targets[@]}))
        for target in "${cell_targets[@]:first}" "${cell_targets[@]:0:first}"; do
            runs[$target]+="$(bench "$target" "$mode" "$clients" "$connect")"$'\n'
        done
    done
    dtps= dmed=
    for target in ${cell_targets[@]}; do
        if grep -q '^failed' <<<"${runs[$target]}"; then
            printf '%-10s %7d %-9s %10s\n' "$label" "$clients" "$target" failed
            continue
        fi
        tps=$(awk 'NF { print $1 }' <<<"${runs[$target]}" | median)
        med=$(awk 'NF { print $2 }' <<<"${runs[$target]}" | median)
        mean=$(awk 'NF { print $3 }' <<<"${runs[$target]}" | median)
        cpu=$(awk 'NF { print $4 }' <<<"${runs[$target]}" | median)
        range=$(awk 'NF { print $1 }' <<<"${runs[$target]}" | sort -g | awk 'NR == 1 { lo = $1 } END { printf "%.0f-%.0f", lo, $1 }')
        [ "$target" = direct ] && { dtps=$tps; dmed=$med; }
        awk -v l="$label" -v c="$clients" -v t="$target" -v tps="$tps" -v d="$dtps" -v med="$med" -v dm="$dmed" -v mean="$mean" -v cpu="$cpu" -v r="$range" 'BEGIN {
            printf "%-10s %7d %-9s %10.0f %7.2f %10.3f %9.3f %11.0f %11s  %s\n", l, c, t, tps, tps / d, med, mean, (med - dm) * 1000, cpu, r }'
    done
    # pgrouter's TPS over PgBouncer's in each round: the two ran a few seconds apart, so the
    # machine's slower and faster minutes mostly cancel out of each ratio
    if [ -n "${runs[pgbouncer]:-}" ] && ! grep -q '^failed' <<<"${runs[pgbouncer]}${runs[pgrouter]}"; then
        ratios=$(paste <(awk 'NF { print $1 }' <<<"${runs[pgrouter]}") <(awk 'NF { print $1 }' <<<"${runs[pgbouncer]}") |
            awk '{ printf "%.2f\n", $1 / $2 }')
        echo "  pgrouter / pgbouncer by round: $(echo $ratios) (median $(median <<<"$ratios"))"
    fi
    unset runs
done

if [ "$IDLE" != 0 ]; then
    echo
    echo "pgrouter: $(python3 benches/idle_clients.py --port "$pr_port" --pid "$pgrouter_pid" --count "$IDLE")"
fi
