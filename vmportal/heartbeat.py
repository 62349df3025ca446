"""Liveness marks in Redis, written by the worker, beat and listener and read by /healthz."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from django.conf import settings

PREFIX = "vmportal:heartbeat:"
TTL_SECONDS = 30


def client() -> redis.Redis:
    """A Redis client that fails fast, so a dead Redis never hangs a caller."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1.0, socket_timeout=2.0)


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
