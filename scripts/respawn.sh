#!/usr/bin/env bash
# Runs a command and starts it again whenever it fails on its own: a Celery worker can die of a
# broker connection it cannot recover (kombu, when Redis restarts with a message unacknowledged),
# and under `make run` one dead process would stop the whole stack. A clean exit (status 0) ends
# it; SIGTERM or SIGINT is passed on to the command and ends it too.
# Usage: scripts/respawn.sh command [args...]
set -uo pipefail
child=0
stopping=0
stop() {
  stopping=1
  if (( child > 0 )); then kill -TERM "$child" 2>/dev/null; fi
}
trap stop TERM INT

delay=1
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  # A trapped signal ends `wait` early: wait again until the command has really exited.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"
  rc=$?
  child=0
  if (( stopping || rc == 0 )); then exit "$rc"; fi
  # Back off while it keeps failing at once; a run of a minute or more starts the count anew.
  (( SECONDS - started >= 60 )) && delay=1
  echo "respawn: $1 exited with status $rc; starting it again in ${delay}s" >&2
  sleep "$delay" &
  wait $!
  (( stopping )) && exit "$rc"
  (( delay = delay < 30 ? delay * 2 : 30 ))
done
