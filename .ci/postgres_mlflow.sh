#!/usr/bin/env bash
# A throwaway team-tracking stack on loopback, for CI and for trying the setup of
# docs/scale_out.md: a private PostgreSQL cluster + `mlflow server` using it as backend
# store, with artifacts proxied by the server into a local folder. Nothing listens
# beyond 127.0.0.1; the machine's own PostgreSQL cluster (if any) is not touched.
#
#   vars=$(.ci/postgres_mlflow.sh start) && eval "$vars"   # prints `export NAME=value` lines
#   .ci/postgres_mlflow.sh stop                            # uses $TOOLCHAIN_CI_TRACKING_STATE
#
# start exports MLFLOW_TEST_SERVER_URI (the server), MLFLOW_TEST_BACKEND_URI (PostgreSQL, for
# tests that look into the database), MLFLOW_TEST_ARTIFACTS_DIR and TOOLCHAIN_CI_TRACKING_STATE.
# Needs: the venv (make venv), and PostgreSQL (installed with apt-get when missing; root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
log() { echo "[postgres_mlflow] $*" >&2; }
die() { log "error: $*"; exit 1; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# PostgreSQL refuses to run as root: run its tools as the `postgres` user the package creates.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

install_postgres() {
    [ -n "$(pg_bindir)" ] && return 0
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and we are not root: apt-get install postgresql"
    log "installing postgresql (apt-get)"
    apt-get install -y -q postgresql >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; } \
        || die "apt-get install postgresql failed"
}

start() {
    [ -x "$PY" ] || die "$PY not found; run \`make venv\` first"
    install_postgres
    local bin state pg_port mlflow_port password
    bin=$(pg_bindir)
    state=$(mktemp -d "${TMPDIR:-/tmp}/toolchain-ci-tracking.XXXXXX")
    export TOOLCHAIN_CI_TRACKING_STATE=$state
    trap 'log "start failed; cleaning up"; stop' EXIT
    chmod 755 "$state"
    # $state/pg: data, socket and log, owned by the cluster's user and private to it
    mkdir -p "$state/pg/data" "$state/artifacts"
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$state/pg"; fi
    chmod -R 700 "$state/pg"
    pg_port=$(free_port)
    mlflow_port=$(free_port)
    password=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')

    log "PostgreSQL: private cluster in $state/pg on 127.0.0.1:$pg_port"
    # the socket (trust) is only reachable by the cluster's owner; TCP needs the password (scram)
    as_pg "$bin/initdb" -D "$state/pg/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 >"$state/initdb.log" 2>&1 || { cat "$state/initdb.log" >&2; false; }
    as_pg "$bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $state/pg" start >/dev/null \
        || { tail -n 20 "$state/pg/postgres.log" >&2; false; }
    as_pg "$bin/psql" -q -h "$state/pg" -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE mlflow LOGIN PASSWORD '$password'" -c "CREATE DATABASE mlflow OWNER mlflow" >/dev/null

    log "psycopg2 (PostgreSQL driver for mlflow server) into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt psycopg2-binary

    log "mlflow server on http://127.0.0.1:$mlflow_port (backend PostgreSQL, artifacts $state/artifacts)"
    # +psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed.
    # password via PGPASSWORD (libpq), not in the URI: it stays out of `ps` and MLflow's logs.
    # setsid: the server and its workers form one process group that `stop` ends by its id.
    PGPASSWORD=$password setsid "$VENV/bin/mlflow" server \
        --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$pg_port/mlflow" \
        --default-artifact-root mlflow-artifacts:/ --artifacts-destination "$state/artifacts" \
        --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
        >"$state/mlflow.log" 2>&1 </dev/null &
    echo $! >"$state/mlflow.pid"
    wait_for_server "http://127.0.0.1:$mlflow_port" "$(cat "$state/mlflow.pid")" "$state/mlflow.log"
    trap - EXIT

    umask 077
    cat >"$state/env" <<EOF
export TOOLCHAIN_CI_TRACKING_STATE=$state
export MLFLOW_TEST_SERVER_URI=http://127.0.0.1:$mlflow_port
export MLFLOW_TEST_BACKEND_URI=postgresql+psycopg2://mlflow:$password@127.0.0.1:$pg_port/mlflow
export MLFLOW_TEST_ARTIFACTS_DIR=$state/artifacts
EOF
    cat "$state/env"
}

wait_for_server() {  # url pid log: until GET /health answers (schema migrations take a while)
    local i
    for i in $(seq 1 180); do
        if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' "$1" 2>/dev/null; then
            log "mlflow server answers after ${i}s"
            return 0
        fi
        kill -0 "$2" 2>/dev/null || { tail -n 30 "$3" >&2; die "mlflow server exited"; }
        sleep 1
    done
    tail -n 30 "$3" >&2
    die "mlflow server did not answer within 180 s"
}

stop() {
    local state=${TOOLCHAIN_CI_TRACKING_STATE:-}
    [ -n "$state" ] && [ -d "$state" ] || { log "nothing to stop"; return 0; }
    if [ -f "$state/mlflow.pid" ]; then
        local pid i
        pid=$(cat "$state/mlflow.pid")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    if [ -f "$state/pg/data/postmaster.pid" ]; then
        as_pg "$(pg_bindir)/pg_ctl" -D "$state/pg/data" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$state"
    log "stopped; removed $state"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
