#!/usr/bin/env bash
# Runs the test suite the way `make test` promises: its own Redis on a free port, a libvirtd (started
# when none answers), then pytest with every marker. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

export LIBVIRT_URI=${LIBVIRT_URI:-qemu:///system}
scripts/ensure-libvirtd.sh
LIBVIRT_URI=test+unix:///default scripts/ensure-libvirtd.sh

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rdir=$(mktemp -d /tmp/vmportal-test-redis.XXXXXX)
redis-server --bind 127.0.0.1 --port "$port" --dir "$rdir" --save "" --appendonly no \
  --logfile "$rdir/redis.log" &
redis_pid=$!
cleanup() { kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; rm -rf "$rdir"; }
trap cleanup EXIT
for _ in $(seq 1 50); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
export REDIS_URL="redis://127.0.0.1:$port/0"

mkdir -p test-artifacts
.venv/bin/python manage.py collectstatic --noinput -v0
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if (( rc == 5 )); then echo "test: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
