"""Turns an unreachable backing service into a clear 503 page naming it, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

log = logging.getLogger(__name__)


def _part_of(exc: Exception) -> str | None:
    if isinstance(exc, OperationalError | InterfaceError):
        return "database"
    if isinstance(exc, DatabaseError) and "no such table" in str(exc):
        return "database (not migrated: run `make run` or `manage.py migrate`)"
    if isinstance(exc, redis.RedisError):
        return "redis"
    if type(exc).__module__.startswith("provisioning.hypervisor") and type(exc).__name__ in {
        "ConnectionLost",
        "Unreachable",
    }:
        return "libvirt"
    return None


class ServiceUnavailableMiddleware:
    """Maps a failure of the database, Redis or libvirt to a 503 page that names the part."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        part = _part_of(exception)
        if part is None:
            return None
        log.error("%s unavailable while serving %s: %s", part, request.path, exception)
        body = render_to_string("503.html", {"part": part, "error": str(exception)[:300]})
        return HttpResponse(body, status=503)
