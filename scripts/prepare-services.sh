#!/usr/bin/env bash
# Makes the local services the tests need ready, idempotently: PostgreSQL
# (with prepared transactions enabled for XA) and MariaDB, each with a `test`
# database. Safe to run again and again; restarts PostgreSQL only when its
# max_prepared_transactions must change.
set -euo pipefail

log() { printf '[prepare] %s\n' "$*" >&2; }

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
psql_root() { psql -h 127.0.0.1 -U postgres -d postgres -qtAX "$@"; }

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL"
    apt-get install -y -q postgresql >/dev/null
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
    apt-get install -y -q mariadb-server >/dev/null
  fi
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  for _ in $(seq 1 60); do maria_up && break; sleep 0.5; done
  maria_up || { log "MariaDB did not come up"; exit 1; }
fi
mariadb -h 127.0.0.1 -uroot -e 'create database if not exists test'
log "MariaDB ready"
