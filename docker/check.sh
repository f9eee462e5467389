#!/usr/bin/env bash
# Checks what can be checked here without a Docker engine: docker-compose.yml against the
# compose schema (docker-compose config), every YAML file parses, the Kubernetes manifest
# holds the objects it should, the Grafana dashboard is JSON whose queries name only
# metrics pgrouter exports, Prometheus' config passes promtool, the pgrouter configs pass
# `pgrouter check`. Installs docker-compose and promtool (Debian packages) when missing.
#   docker/check.sh <path to the pgrouter binary>
set -euo pipefail
pgrouter=$(realpath "${1:?usage: docker/check.sh <pgrouter binary>}")
cd "$(dirname "$0")"

# apt-get that waits for dpkg's lock (tests may be installing packages at the same time)
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
need() {
    command -v "$1" >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt_get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
        || { apt_get update -qq >/dev/null && apt_get install -y -qq --no-install-recommends "$2" >/dev/null; }
}
need docker-compose docker-compose
need promtool prometheus
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml

docker-compose -f docker-compose.yml config -q
promtool check config prometheus.yml >/dev/null
"$pgrouter" check --config pgrouter.toml >/dev/null
python3 - <<'PY'
import json, re, yaml
for path in ["docker-compose.yml", "prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
             "grafana/provisioning/dashboards/pgrouter.yml"]:
    yaml.safe_load(open(path))
kinds = sorted(d["kind"] for d in yaml.safe_load_all(open("kubernetes.yaml")))
assert kinds == ["ConfigMap", "Service", "Service", "StatefulSet"], kinds
dashboard = json.load(open("grafana/dashboards/pgrouter.json"))
exported = {
    "pgrouter_clients", "pgrouter_pool_servers", "pgrouter_pool_size", "pgrouter_pool_wait_seconds_bucket",
    "pgrouter_pool_wait_timeouts_total", "pgrouter_queries_total", "pgrouter_query_duration_seconds_bucket",
    "pgrouter_transactions_total", "pgrouter_server_up", "pgrouter_replica_lag_seconds", "pgrouter_bans_total",
    "pgrouter_pinned_clients", "pgrouter_errors_total",
}
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for name in re.findall(r"pgrouter_[a-z_]+", target["expr"]):
            assert name in exported, f"{panel['title']}: {name} is not a pgrouter metric"
PY
# the config embedded in the Kubernetes manifest
python3 -c 'import sys, yaml; print(next(yaml.safe_load_all(open("kubernetes.yaml")))["data"]["pgrouter.toml"])' >"${TMPDIR:-/tmp}/pgrouter-k8s.toml"
PGROUTER_INSTANCE_ID=2 "$pgrouter" check --config "${TMPDIR:-/tmp}/pgrouter-k8s.toml" >/dev/null
echo "docker/: compose, prometheus, grafana, kubernetes and pgrouter configs check out"
