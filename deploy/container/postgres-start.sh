#!/bin/sh
# First start: initdb into a scratch directory in the volume, create role and database `tabiji`
# with the password from POSTGRES_PASSWORD, allow SCRAM logins over the network, then rename it
# into place — an interrupted first start leaves no half-made cluster behind.
# Every start: run postgres in the foreground (its socket in the /tmp tmpfs).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  scratch="$PGDATA.init"
  rm -rf "$scratch"
  umask 077
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --pgdata="$scratch" --username=postgres --auth-local=peer --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$scratch/postgresql.conf" <<CONF
listen_addresses = '*'
unix_socket_directories = '/tmp'
password_encryption = 'scram-sha-256'
CONF
  echo "host all all all scram-sha-256" >>"$scratch/pg_hba.conf"
  pg_ctl --pgdata="$scratch" -o "-c listen_addresses=''" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 -h /tmp -U postgres -d postgres -q \
    -v password="$(cat "$pwfile")" <<'SQL'
CREATE ROLE tabiji LOGIN PASSWORD :'password';
CREATE DATABASE tabiji OWNER tabiji;
SQL
  rm -f "$pwfile"
  pg_ctl --pgdata="$scratch" -m fast -w stop >/dev/null
  mv "$scratch" "$PGDATA"
fi
exec postgres -D "$PGDATA"
