#!/usr/bin/env bash
# Prints the DATABASE_URL of a PostgreSQL that really works, starting one of our own if need be.
#
# The machine's server ($VMPORTAL_PG_MACHINE, default 127.0.0.1:5432) is used when a query there succeeds (not merely when the
# port answers: a server whose shared memory went away still accepts TCP connections and then
# fails every login). Otherwise a private cluster under $VMPORTAL_PG_DIR (default
# /var/tmp/vmportal-pg) is started, or found running, on 127.0.0.1:$VMPORTAL_PG_PORT (55432),
# with trust authentication for local connections only; Debian's postgresql package is installed
# first when no server binaries are here. Needs root for that (the server runs as postgres).
#
#   ensure-postgres.sh          print the URL (database "vmportal"; tests make their own)
#   ensure-postgres.sh stop     stop the private cluster, if it runs
set -euo pipefail

DIR=${VMPORTAL_PG_DIR:-/var/tmp/vmportal-pg}
PORT=${VMPORTAL_PG_PORT:-55432}
MACHINE=${VMPORTAL_PG_MACHINE:-127.0.0.1:5432}  # the machine's own server, tried first

works() {  # host port: a login and a query succeed within 10 s
  PGCONNECT_TIMEOUT=5 timeout 10 "$psql" -X -q -h "$1" -p "$2" -U postgres -d postgres \
    -Atc 'select 1' >/dev/null 2>&1
}

bindir() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [[ -n $found && -x $found/initdb ]] && echo "$found"
}

bin=$(bindir || true)
if [[ ${1:-} == stop ]]; then
  [[ -n $bin && -f $DIR/data/postmaster.pid ]] || exit 0
  runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
  exit 0
fi

psql=$(command -v psql || true)
if [[ -n $psql ]] && works "${MACHINE%:*}" "${MACHINE##*:}"; then
  echo "postgres://postgres@$MACHINE/vmportal"
  exit 0
fi

if [[ -z $bin ]]; then
  echo "ensure-postgres: installing Debian's postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends postgresql >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends postgresql >&2; }
  bin=$(bindir)
fi
psql=$bin/psql
[[ -x $psql ]] || psql=$(command -v psql)

if ! works 127.0.0.1 "$PORT"; then
  echo "ensure-postgres: starting a private PostgreSQL in $DIR on 127.0.0.1:$PORT" >&2
  mkdir -p "$DIR"
  chown postgres:postgres "$DIR"
  chmod 0700 "$DIR"
  if [[ ! -s $DIR/data/PG_VERSION ]]; then
    rm -rf "$DIR/data"
    runuser -u postgres -- "$bin/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 \
      --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 ||
      { cat "$DIR/initdb.log" >&2; exit 1; }
  fi
  # A server of an earlier run that died leaves its pid file; pg_ctl sees it is stale.
  runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$DIR" \
    -o "-c max_connections=200 -c fsync=off" start >&2 ||
    { tail -20 "$DIR/server.log" >&2; exit 1; }
  works 127.0.0.1 "$PORT" ||
    { echo "ensure-postgres: the private server does not answer" >&2; exit 1; }
fi
echo "postgres://postgres@127.0.0.1:$PORT/vmportal"
