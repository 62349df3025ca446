"""Liveness marks in Redis, written by the worker, beat and listener and read by /healthz."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis
from django.conf import settings

PREFIX = "vmportal:heartbeat:"
TTL_SECONDS = 30


_clients: dict[str, redis.Redis] = {}


def client() -> redis.Redis:
    """A Redis client that fails fast, so a dead Redis never hangs a caller; one per process."""
    url = settings.REDIS_URL
    shared = _clients.get(url)
    if shared is None:
        # Shared, so each publish or heartbeat reuses a pooled connection instead of opening a
        # TCP connection of its own (measured: most of a provision's time went to connecting).
        # The pool is thread-safe and starts afresh in a forked child.
        shared = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        _clients[url] = shared
    return shared


def beat(part: str, ident: str, **info: Any) -> None:
    """Record that `part` (worker, beat, listener) instance `ident` is alive now."""
    payload = json.dumps({"at": time.time(), **info})
    client().set(f"{PREFIX}{part}:{ident}", payload, ex=TTL_SECONDS)


def alive(part: str) -> dict[str, dict[str, Any]]:
    """The live instances of `part`, by ident, with what each last said."""
    conn = client()
    keys = list(conn.scan_iter(match=f"{PREFIX}{part}:*", count=100))
    if not keys:
        return {}
    values = conn.mget(keys)
    found: dict[str, dict[str, Any]] = {}
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue
        ident = key.decode().removeprefix(f"{PREFIX}{part}:")
        found[ident] = json.loads(value)
    return found


def lead(role: str, *, ttl: int) -> bool:
    """Claim or keep the single leader slot for `role` (e.g. one acting beat); True if ours."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    key = f"vmportal:leader:{role}"
    conn = client()
    if conn.set(key, me, nx=True, ex=ttl):
        return True
    # Renew only our own claim, atomically.
    renewed = conn.eval(
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end",
        1,
        key,
        me,
        ttl,
    )
    return bool(renewed)
