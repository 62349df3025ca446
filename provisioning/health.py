"""Health of every part the portal needs, for /healthz and the startup checks."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from django.conf import settings
from django.db import connection

from vmportal import heartbeat

LIBVIRT_TIMEOUT = 3.0


@dataclass
class PartHealth:
    """One part's verdict: ok or not, why, and what was seen."""

    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def check_database() -> PartHealth:
    vendor = connection.vendor
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means "down", with its message
        return PartHealth(False, f"database unreachable: {exc}", {"vendor": vendor})
    return PartHealth(True, "query answered", {"vendor": vendor})


def check_redis() -> PartHealth:
    try:
        heartbeat.client().ping()
    except redis.RedisError as exc:
        return PartHealth(False, f"redis unreachable at {_redacted(settings.REDIS_URL)}: {exc}")
    return PartHealth(True, "ping answered", {"url": _redacted(settings.REDIS_URL)})


def _heartbeats(part: str, what: str) -> PartHealth:
    try:
        seen = heartbeat.alive(part)
    except redis.RedisError as exc:
        return PartHealth(False, f"unknown: redis unreachable ({exc})")
    if not seen:
        return PartHealth(False, f"no {what} heartbeat in the last {heartbeat.TTL_SECONDS} s")
    now = time.time()
    details = {
        ident: {**info, "age_s": round(now - info.get("at", now), 1)}
        for ident, info in seen.items()
    }
    return PartHealth(True, f"{len(seen)} alive", details)


def check_workers() -> PartHealth:
    return _heartbeats("worker", "celery worker")


def check_beat() -> PartHealth:
    return _heartbeats("beat", "celery beat")


def check_listener() -> PartHealth:
    result = _heartbeats("listener", "event listener")
    if result.ok:
        disconnected = [
            ident for ident, info in result.details.items() if not info.get("connected")
        ]
        if disconnected and len(disconnected) == len(result.details):
            return PartHealth(
                False, "listener runs but is not connected to libvirt", result.details
            )
    return result


def _probe_libvirt(uri: str) -> dict[str, Any]:
    from provisioning.hypervisor.connection import get_hypervisor

    return dict(get_hypervisor(uri, readonly=True).version())


def check_libvirt() -> PartHealth:
    uris = _libvirt_uris()
    details: dict[str, Any] = {}
    ok = True
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(uris), 8))) as pool:
        futures = {uri: pool.submit(_probe_libvirt, uri) for uri in uris}
        for uri, future in futures.items():
            try:
                info = future.result(timeout=LIBVIRT_TIMEOUT)
            except concurrent.futures.TimeoutError:
                ok = False
                details[uri] = {"reachable": False, "error": f"no answer in {LIBVIRT_TIMEOUT} s"}
            except Exception as exc:  # noqa: BLE001
                ok = False
                details[uri] = {"reachable": False, "error": str(exc)}
            else:
                details[uri] = {"reachable": True, **info}
    if ok:
        return PartHealth(True, f"{len(uris)} reachable", details)
    down = ", ".join(uri for uri, d in details.items() if not d["reachable"])
    return PartHealth(False, f"libvirt unreachable at {down}", details)


def _libvirt_uris() -> list[str]:
    from provisioning.models import Host

    try:
        uris = list(Host.objects.filter(enabled=True).values_list("uri", flat=True))
    except Exception:  # noqa: BLE001 - without the database, check the configured local host
        uris = []
    return uris or [settings.LIBVIRT_URI]


CHECKS = {
    "database": check_database,
    "redis": check_redis,
    "celery_workers": check_workers,
    "celery_beat": check_beat,
    "event_listener": check_listener,
    "libvirt": check_libvirt,
}


def run_all() -> dict[str, PartHealth]:
    """Every part's health; a check that raises counts as down, naming the error."""
    results: dict[str, PartHealth] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001
            results[name] = PartHealth(False, f"check failed: {exc}")
    return results


def as_json(results: dict[str, PartHealth]) -> dict[str, Any]:
    return {
        "ok": all(r.ok for r in results.values()),
        "parts": {name: asdict(r) for name, r in results.items()},
    }


def _redacted(url: str) -> str:
    """The URL without a password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
