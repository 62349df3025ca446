#!/usr/bin/env bash
# Makes sure Redis answers at REDIS_URL; starts a local redis-server on that port when none does.
set -euo pipefail
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#redis://}; hostport=${hostport##*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}
[[ "$port" == "$host" ]] && port=6379

if redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG; then exit 0; fi
case "$host" in
  127.0.0.1|localhost) ;;
  *) echo "redis: nothing answers at $host:$port, and it is not local" >&2; exit 1 ;;
esac
dir=${VMPORTAL_VAR_DIR:-$(cd "$(dirname "$0")/.." && pwd)/var}/redis-$port
mkdir -p "$dir"
echo "redis: starting redis-server on $host:$port"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
  --save "" --appendonly no --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
for _ in $(seq 1 50); do
  redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG && exit 0
  sleep 0.1
done
echo "redis: started, but nothing answers at $host:$port (see $dir/redis.log)" >&2
exit 1
