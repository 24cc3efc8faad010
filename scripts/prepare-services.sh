#!/usr/bin/env bash
# Makes the local services the tests need ready, idempotently: PostgreSQL
# (with prepared transactions enabled for XA) and MariaDB, each with a `test`
# database; NATS with JetStream and RabbitMQ (message destinations). Safe to run again and again; restarts PostgreSQL only when its
# max_prepared_transactions must change.
set -euo pipefail

log() { printf '[prepare] %s\n' "$*" >&2; }

# Installs Debian packages, refreshing the index once if it is stale.
install() {
  apt-get install -y -q "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null
  }
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
psql_root() { psql -h 127.0.0.1 -U postgres -d postgres -qtAX "$@"; }

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL"
    install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main "$1" >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do pg_up && return 0; sleep 0.5; done
  log "PostgreSQL did not come up"; return 1
}

pg_up || start_postgres start
current=$(psql_root -c "show max_prepared_transactions")
if [ "${current:-0}" -lt 64 ]; then
  log "max_prepared_transactions is ${current:-0}; setting 128 and restarting PostgreSQL"
  psql_root -c "alter system set max_prepared_transactions = 128"
  start_postgres restart
fi
if [ "$(psql_root -c "select 1 from pg_database where datname = 'test'")" != "1" ]; then
  psql_root -c "create database test"
fi
log "PostgreSQL ready (max_prepared_transactions=$(psql_root -c 'show max_prepared_transactions'))"

maria_up() { mariadb -h 127.0.0.1 -uroot -e 'select 1' >/dev/null 2>&1; }
if ! maria_up; then
  if ! command -v mariadbd >/dev/null; then
    log "installing MariaDB"
    install mariadb-server
  fi
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  for _ in $(seq 1 60); do maria_up && break; sleep 0.5; done
  maria_up || { log "MariaDB did not come up"; exit 1; }
fi
mariadb -h 127.0.0.1 -uroot -e 'create database if not exists test'
log "MariaDB ready"

# NATS: the server's INFO line says whether JetStream is on.
nats_info() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222; head -1 <&3' 2>/dev/null; }
if ! port_open 4222; then
  if ! command -v nats-server >/dev/null; then
    log "installing NATS"
    install nats-server
  fi
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  for _ in $(seq 1 60); do port_open 4222 && break; sleep 0.5; done
fi
case "$(nats_info)" in
  *'"jetstream":true'*) log "NATS ready (JetStream on)" ;;
  *) log "NATS on 127.0.0.1:4222 runs without JetStream; restart it with -js"; exit 1 ;;
esac

if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing RabbitMQ"
    install rabbitmq-server
  fi
  rabbitmq-server -detached >/dev/null 2>&1 || true
  timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do port_open 5672 && break; sleep 0.5; done
  port_open 5672 || { log "RabbitMQ did not come up"; exit 1; }
fi
log "RabbitMQ ready"

# Python tools for the HTTP API's tests: the plain-`requests` client and
# schemathesis (PyPI, pinned in clients/python/requirements.txt).
if ! python3 -c "import requests, playwright" 2>/dev/null || ! command -v schemathesis >/dev/null; then
  log "installing the Python test tools"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r "$(dirname "$0")/../clients/python/requirements.txt"
fi
log "Python tools ready"

# Debian's chromium, driven headless by the dashboard's browser test.
if ! command -v chromium >/dev/null; then
  log "installing chromium"
  install chromium
fi
log "chromium ready"
