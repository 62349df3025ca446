"""Middleware: a clear 503 page naming an unreachable backing service, never a traceback; and
the audit origin (channel, user, address) of every page and admin request."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

from .services import audit

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
        if request.path_info.startswith("/api/"):
            return _api_problem(request, exception, part)
        if part is None:
            return None
        log.error("%s unavailable while serving %s: %s", part, request.path, exception)
        body = render_to_string("503.html", {"part": part, "error": str(exception)[:300]})
        return HttpResponse(body, status=503)


def _api_problem(request: HttpRequest, exception: Exception, part: str | None) -> HttpResponse:
    """Under /api/ a failure is problem details as every other API error, never an HTML page."""
    if part is None:
        log.error("error serving %s", request.path, exc_info=exception)
        status, detail = 500, "The server failed to answer; the error is logged."
    else:
        log.error("%s unavailable while serving %s: %s", part, request.path, exception)
        status, detail = 503, f"The {part} is unavailable: {str(exception)[:300]}"
    body: dict[str, object] = {
        "type": "about:blank",
        "title": "Server error" if status == 500 else "Service unavailable",
        "status": status,
        "detail": detail,
        "instance": request.path,
        "errors": [],
    }
    return HttpResponse(json.dumps(body), status=status, content_type="application/problem+json")


class AuditOriginMiddleware:
    """Records what a page, admin or API request does as coming through "web", "admin" or
    "api", from its user (and token) and address."""

    sync_capable = True
    async_capable = True  # so it never forces an adapter into an async chain

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        with _origin_of(request):
            return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        get_response: Callable[[HttpRequest], Awaitable[HttpResponse]] = self.get_response
        with _origin_of(request):
            return await get_response(request)


def _origin_of(request: HttpRequest) -> contextlib.AbstractContextManager[Any]:
    path = request.path_info
    if path.startswith("/api/"):
        # Who calls is known once the API has authenticated the token or session (set_user).
        return audit.acting(audit.Channel.API, ip=request.META.get("REMOTE_ADDR"))
    # The user is found only if a row is recorded, and as the request has it then: a login
    # replaces request.user with the user who just logged in.
    return audit.acting(
        audit.Channel.ADMIN if path.startswith("/admin/") else audit.Channel.WEB,
        user=lambda: getattr(request, "user", None),
        ip=request.META.get("REMOTE_ADDR"),
    )


class ApiHeadMiddleware:
    """HEAD on the API answers as its GET would, without the body (the API's operations are
    declared for GET only, which answered HEAD with 405). A stream (SSE) is not started."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method != "HEAD" or not request.path_info.startswith("/api/"):
            return self.get_response(request)
        request.method = "GET"
        try:
            response = self.get_response(request)
        finally:
            request.method = "HEAD"
        if response.streaming:
            headless = HttpResponse(status=response.status_code)
            for name, value in response.items():
                headless[name] = value
            return headless
        length = len(response.content)
        response.content = b""
        response["Content-Length"] = str(length)
        return response
