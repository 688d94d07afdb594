#!/usr/bin/env bash
# Starts the machine's PostgreSQL for the test suite and makes a test role and database.
# Installs PostgreSQL with apt when it is missing and we are root. Prints the DSN on stdout.
# Safe to run again: every step checks before it acts.
set -euo pipefail

role=cairn
password=cairn
database=cairn_test
port=${CAIRN_PG_PORT:-5432}

log() { echo "postgres-up: $*" >&2; }

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing PostgreSQL"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    log "PostgreSQL is not installed and cannot be installed here"
    exit 1
  fi
fi

version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -q "^$version main$"; then
  log "creating cluster $version/main"
  pg_createcluster "$version" main -p "$port" >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
  log "starting cluster $version/main on port $port"
  pg_ctlcluster "$version" main start >&2
fi

for _ in $(seq 1 50); do
  if as_postgres psql -p "$port" -Atqc "SELECT 1" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

if [ "$(as_postgres psql -p "$port" -Atqc "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" != 1 ]; then
  as_postgres psql -p "$port" -qc "CREATE ROLE $role LOGIN SUPERUSER PASSWORD '$password'" >&2
fi
if [ "$(as_postgres psql -p "$port" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
  as_postgres psql -p "$port" -qc "CREATE DATABASE $database OWNER $role" >&2
fi
echo "postgresql://$role:$password@127.0.0.1:$port/$database"
