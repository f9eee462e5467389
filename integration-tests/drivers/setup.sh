#!/usr/bin/env bash
# Installs what the real-driver matrix needs, once, into $1 (default target/drivers):
# a Python venv from requirements.txt, node-postgres from package-lock.json, and Debian's
# PostgreSQL JDBC driver with the Java check compiled against it. Safe to run again: it only
# redoes what changed. Prints nothing on success but the location.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../target/drivers}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Python: rebuild the venv when requirements.txt changes
stamp="$out/venv/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
    rm -rf "$out/venv"
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi

# Node: node_modules next to package.json, from the lock file
if ! cmp -s "$here/node/package-lock.json" "$here/node/node_modules/.package-lock-copy" 2>/dev/null; then
    (cd "$here/node" && npm ci --silent --no-audit --no-fund >/dev/null)
    cp "$here/node/package-lock.json" "$here/node/node_modules/.package-lock-copy"
fi

# Java: Debian's driver; the check is compiled against it
jar=/usr/share/java/postgresql.jar
if [ ! -f "$jar" ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        # waits for dpkg's lock: the metrics test may be installing promtool at the same time
        apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
        apt_get install -y -qq libpostgresql-jdbc-java >/dev/null 2>&1 \
            || { apt_get update -qq >/dev/null && apt_get install -y -qq libpostgresql-jdbc-java >/dev/null; }
    else
        echo "setup.sh: $jar is missing and we are not root to install libpostgresql-jdbc-java" >&2
        exit 1
    fi
fi
mkdir -p "$out/java"
if [ ! -f "$out/java/JdbcCheck.class" ] || [ "$here/java/JdbcCheck.java" -nt "$out/java/JdbcCheck.class" ]; then
    javac -d "$out/java" -cp "$jar" "$here/java/JdbcCheck.java"
fi
echo "$out"
