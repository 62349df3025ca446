#!/usr/bin/env bash
# Runs a command and starts it again whenever it fails on its own: a Celery worker can die of a
# broker connection it cannot recover (kombu, when Redis restarts with a message unacknowledged),
# and under `make run` one dead process would stop the whole stack. A clean exit (status 0) ends
# it; SIGTERM or SIGINT is passed on to the command and ends it too, once the command has exited,
# with the status of a process stopped by that signal (143 or 130).
# Usage: scripts/respawn.sh command [args...]
set -uo pipefail
child=0
stopping=0
stop() {
  stopping=$1
  if (( child > 0 )); then kill -TERM "$child" 2>/dev/null; fi
}
trap 'stop 143' TERM
trap 'stop 130' INT

delay=1
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  # A trapped signal ends `wait` early: wait again until the command has really exited. After
  # such an interruption bash's `wait` may report a status that is not the command's (-1, seen
  # under load), so a stop ends with the signal's status, never with what `wait` said.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"
  rc=$?
  child=0
  if (( stopping )); then exit "$stopping"; fi
  if (( rc == 0 )); then exit 0; fi
  # Back off while it keeps failing at once; a run of a minute or more starts the count anew.
  (( SECONDS - started >= 60 )) && delay=1
  echo "respawn: $1 exited with status $rc; starting it again in ${delay}s" >&2
  sleep "$delay" &
  wait $!
  if (( stopping )); then exit "$stopping"; fi
  (( delay = delay < 30 ? delay * 2 : 30 ))
done
