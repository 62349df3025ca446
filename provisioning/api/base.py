"""The API's conventions: who is calling (token or session), errors as problem details, rate
limits, cursors, ETags. The operations themselves are in `routes`."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, AuthorizationError, HttpError, ValidationError
from ninja.responses import NinjaJSONEncoder
from ninja.security import APIKeyCookie, HttpBearer
from ninja.security.session import SessionAuth

from provisioning.models import ApiToken
from provisioning.services import audit, tokens

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What any operation may answer besides its success; each documented in the OpenAPI document.
ERRORS = (400, 401, 403, 404, 409, 412, 422, 429)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the user, and the token when it is not the browser's session."""

    user: User
    token: ApiToken | None = None

    def __bool__(self) -> bool:
        return True


class Problem(HttpError):
    """An error answered as problem details (RFC 9457)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str = "",
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail)
        self.detail = detail
        self.title = title
        self.errors = errors or []
        self.headers = headers or {}


TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    422: "Invalid request",
    429: "Too many requests",
    500: "Server error",
    503: "Service unavailable",
}


def problem(
    request: HttpRequest,
    status: int,
    detail: str,
    *,
    title: str = "",
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    body = {
        "type": "about:blank",
        "title": title or TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.path,
        "errors": errors or [],
    }
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM)
    for name, value in (headers or {}).items():
        response[name] = value
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="vmportal"'
    return response


# --- who is calling ---


def _client(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR", ""))[:64]


class TokenAuth(HttpBearer):
    """A personal token: `Authorization: Bearer vmp_…`."""

    openapi_scheme = "bearer"

    def __call__(self, request: HttpRequest) -> Caller | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Problem(401, "Use `Authorization: Bearer <token>` with a token of yours.")
        return self.authenticate(request, secret.strip())

    def authenticate(self, request: HttpRequest, token: str) -> Caller | None:
        try:
            found = tokens.token_authenticate(secret=token, client=_client(request))
        except tokens.TokenRefused as refused:
            raise Problem(401, f"The token does not authenticate: {refused}.") from None
        user = found.user
        request.user = user
        audit.set_user(user, found)
        if request.method not in SAFE_METHODS and not found.writes:
            detail = "This token is read-only; make a read-write token to change things."
            method = (request.method or "").lower()
            audit.refused(f"api.{method}", None, detail, object_repr=request.path)
            raise Problem(403, detail)
        _limit(request, f"token:{found.pk}")
        return Caller(user=user, token=found)


class BrowserSession(SessionAuth):
    """The browser's logged-in session; writes need the CSRF token (X-CSRFToken)."""

    def __init__(self) -> None:
        super().__init__(csrf=True)

    def __call__(self, request: HttpRequest) -> Caller | None:
        if request.headers.get("Authorization"):
            return None
        if request.method in SAFE_METHODS:
            request._ninja_csrf_exempt = True  # type: ignore[attr-defined]
        if not getattr(request.user, "is_authenticated", False):
            return None
        found = APIKeyCookie.__call__(self, request)
        if not found:
            return None
        audit.set_user(request.user)
        _limit(request, f"user:{request.user.pk}")
        assert isinstance(request.user, User)
        return Caller(user=request.user)

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        return request.user if request.user.is_authenticated else None


def caller(request: HttpRequest) -> Caller:
    found = request.auth  # type: ignore[attr-defined]
    assert isinstance(found, Caller)
    return found


def require_staff(request: HttpRequest) -> None:
    """404 for everyone but staff: the staff's operations are not there for others."""
    if not caller(request).user.is_staff:
        raise Http404("No such resource")


# --- rate limits ---

_redis: redis.Redis | None = None
_redis_made = threading.Lock()


def _rates() -> redis.Redis:
    """The one client of this process (made once: a client another thread replaced would be
    collected, closing the connection the first thread still reads from)."""
    global _redis
    with _redis_made:
        if _redis is None:
            _redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1)
        return _redis


def _limit(request: HttpRequest, key: str) -> None:
    """Count the call in this minute's window (Redis); 429 with Retry-After past the limit."""
    most = settings.API_RATE_PER_MINUTE
    if most <= 0:
        return
    now = time.time()
    window = int(now // 60)
    name = f"vmportal:api-rate:{key}:{window}"
    try:
        pipe = _rates().pipeline()
        pipe.incr(name)
        pipe.expire(name, 120)
        count = int(pipe.execute()[0])
    except redis.RedisError as exc:
        log.warning("API rate limit not counted (Redis: %s)", exc)
        return  # a missing counter must not take the API down with Redis
    if count > most:
        retry = max(1, int((window + 1) * 60 - now) + 1)
        raise Problem(
            429,
            f"At most {most} calls a minute; try again in {retry} s.",
            headers={"Retry-After": str(retry)},
        )


# --- cursors and ETags ---


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The id a page starts after (0: the first page); 422 for a cursor we did not make."""
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        number = int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        number, kind = -1, ""
    if kind != "after" or not 0 <= number < 2**63:
        raise Problem(
            422,
            "The cursor is not one this API gave out.",
            errors=[{"field": "cursor", "message": "Use the `next` of the page before."}],
        )
    return number


def etag_of(data: Any) -> str:
    body = json.dumps(data, cls=NinjaJSONEncoder, sort_keys=True)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def check_if_match(request: HttpRequest, current: Any) -> None:
    """412 when If-Match names another version of the resource than the current one."""
    wanted = request.headers.get("If-Match")
    if not wanted:
        return
    tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
    if "*" in tags or etag_of(current) in tags:
        return
    raise Problem(
        412, "The resource changed since you read it (If-Match): read it again, then retry."
    )


# --- the API object ---


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": kind}}


def if_match() -> dict[str, Any]:
    """An operation's `openapi_extra` when it honours If-Match (`check_if_match`)."""
    return {
        "parameters": [
            {
                "name": "If-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The ETag of the resource as you read it (or `*`): 412 if it "
                "changed since.",
            }
        ]
    }


def _response_headers(method: str, path: str, status: str) -> dict[str, Any]:
    """The headers the conventions put on an answer: Location on 202s, ETag on a resource
    read or changed, WWW-Authenticate on 401s, Retry-After on 429s."""
    if status == "202":
        return {"Location": _header("The URL of the request or job to follow.")}
    if status == "200" and method in ("get", "patch") and path.endswith("}"):
        return {"ETag": _header("The resource's version, for If-Match.")}
    if status == "401":
        return {"WWW-Authenticate": _header("How to authenticate: a Bearer token.")}
    if status == "429":
        return {"Retry-After": _header("Seconds until calls are taken again.", "integer")}
    return {}


class Api(NinjaAPI):
    """NinjaAPI whose OpenAPI document says errors are application/problem+json, and names
    the headers of its conventions."""

    def get_openapi_schema(self, **kwargs: Any) -> Any:
        schema = super().get_openapi_schema(**kwargs)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if str(status)[0] in "45" and "application/json" in content:
                        content[PROBLEM] = content.pop("application/json")
                    headers = _response_headers(method, path, str(status))
                    if headers:
                        response["headers"] = {**response.get("headers", {}), **headers}
        return schema


api = Api(
    title="vmportal API",
    version="1",
    description=(
        "Everything the pages do, for scripts. Authenticate with a personal token "
        "(`Authorization: Bearer vmp_…`, made on your profile's API tokens page) or the "
        "browser's session (writes need `X-CSRFToken`). Errors are RFC 9457 problem details. "
        "Lists are cursor-paginated: pass the page's `next` as `cursor`."
    ),
    auth=[TokenAuth(), BrowserSession()],
    urls_namespace="api",
    docs_url=None,
    openapi_url="/openapi.json",
)


def _field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for error in errors:
        # The parameter's own name: "cursor", not "query.cursor"; "name", not "body.payload.name".
        loc = [str(part) for part in error.get("loc", ())]
        while loc and loc[0] in ("body", "payload", "query", "path", "header", "cookie"):
            loc.pop(0)
        out.append({"field": ".".join(loc) or "body", "message": str(error.get("msg", ""))})
    return out


@api.exception_handler(ValidationError)
def _invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = _field_errors(exc.errors)
    return problem(request, 422, "The request does not fit the schema.", errors=errors)


@api.exception_handler(Problem)
def _problem(request: HttpRequest, exc: Problem) -> HttpResponse:
    return problem(
        request,
        exc.status_code,
        exc.detail,
        title=exc.title,
        errors=exc.errors,
        headers=exc.headers,
    )


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return problem(request, 401, "Log in, or send a token: `Authorization: Bearer <token>`.")


@api.exception_handler(AuthorizationError)
def _forbidden(request: HttpRequest, exc: AuthorizationError) -> HttpResponse:
    return problem(request, 403, str(exc.message))


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return problem(request, exc.status_code, str(exc.message))


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return problem(request, 404, str(exc) or "No such resource.")


@api.exception_handler(SuspiciousOperation)
def _refused_request(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    """What Django will not read (a body over its size limit, too many query fields...): 400,
    as Django answers it, logged to django.security as Django logs it; as problem details."""
    if isinstance(exc, RequestDataTooBig):
        most = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        detail = f"The body is too large: this API reads at most {most} bytes."
    elif isinstance(exc, TooManyFieldsSent):
        most = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        detail = f"Too many query parameters: this API reads at most {most}."
    else:
        detail = "The request was refused as malformed."
    response = problem(request, 400, detail)
    logging.getLogger(f"django.security.{type(exc).__name__}").error(
        str(exc), extra={"status_code": 400, "request": request}
    )
    return response


def _problems_not_html(view: Callable[..., Any]) -> Callable[..., Any]:
    """A method the path does not take answers problem details too (ninja's 405 is HTML)."""
    if iscoroutinefunction(view):  # the paths of the event streams

        @functools.wraps(view)
        async def awaited(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            return _not_allowed(request, await view(request, *args, **kwargs))

        return awaited

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return _not_allowed(request, view(request, *args, **kwargs))

    return wrapped


def _not_allowed(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    if response.status_code != 405 or response.get("Content-Type", "") == PROBLEM:
        return response
    allowed = response.get("Allow", "")
    answer = problem(
        request, 405, f"{request.method} is not allowed here; use {allowed or 'another method'}."
    )
    if allowed:
        answer["Allow"] = allowed
    return answer


@csrf_exempt
def unknown_path(request: HttpRequest, rest: str = "") -> HttpResponse:
    """What answers under /api/v1/ where no operation is."""
    return problem(request, 404, "No such path in the API; see /api/v1/openapi.json.")


def urls() -> tuple[list[Any], str, str]:
    """The API's URL patterns: every operation, then problem details for any other path."""
    patterns, app_name, namespace = api.urls
    for pattern in patterns:
        if pattern.callback is not None:
            pattern.callback = _problems_not_html(pattern.callback)
    return [*patterns, re_path(r"^(?P<rest>.*)$", unknown_path)], app_name, namespace
