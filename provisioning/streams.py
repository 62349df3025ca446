"""Server-Sent Events for live pages: Redis pub/sub in, rendered partials out (ASGI only)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string

from . import selectors
from .channels import GUESTS, guest_channel, job_channel, owner_channel, request_channel
from .models import Guest, ProvisioningRequest
from .templatetags import rows

log = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 15.0
T = TypeVar("T")
P = ParamSpec("P")
# render(None) on connecting, then render(data of the last message) after messages arrive.
Render = Callable[[bytes | None], Awaitable[list[tuple[str, str]]]]


def in_thread(fn: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """Run fn in the request's thread, then hand that thread's database connection back.

    A stream lives for minutes in a thread of its own; holding a connection all that time ran
    PostgreSQL out of connections (measured: 905 of 1,000 watchers refused with a 503).
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                connection.close()

    return sync_to_async(run)


def _frame(event: str, html: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


def is_stats(data: bytes) -> bool:
    """A usage point the sampler published on a guest's channel (services.stats)."""
    return data.startswith(b'{"stats"')


def stats_data(data: bytes) -> str:
    """The point of a stats message, as the `stats` event's data: {"t": ..., "cpu": ..., ...}."""
    return json.dumps(json.loads(data)["stats"])


async def sse_stream(
    channels: list[str], render: Render, *, final: Callable[[], Any] | None = None
) -> AsyncIterator[bytes]:
    """Send the rendered partial now and after every message on `channels`, until final.

    A usage point on a guest's channel goes out as a `stats` event of its own (its JSON) and
    renders nothing.
    """
    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*channels)
        for event, html in await render(None):
            yield _frame(event, html)
        if final is not None and await final():
            yield _frame("close", "")
            return
        while True:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=KEEPALIVE_SECONDS
            )
            if message is None:
                yield b": keepalive\n\n"
                continue
            # Several messages may arrive together; one render covers them all, except the
            # usage points, which carry their own data and are each sent as they are.
            burst = [message["data"]]
            while more := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01):
                burst.append(more["data"])
            points = [data for data in burst if is_stats(data)]
            rest = [data for data in burst if not is_stats(data)]
            for data in points:
                yield _frame("stats", stats_data(data))
            for event, html in await render(rest[-1]) if rest else ():
                yield _frame(event, html)
            if final is not None and await final():
                yield _frame("close", "")
                return
    finally:
        await pubsub.aclose()
        await client.aclose()


# The latest render per key in this process: (the message it answers, its result).
_renders: dict[str, tuple[bytes, asyncio.Future[Any]]] = {}
_RENDERS_KEPT = 1000
_CSRF_SLOT = "vmportal-csrf-token-slot"


async def _render_once(key: str, message: bytes, make: Callable[[], Awaitable[T]]) -> T:
    """One render per message for every stream of `key` in this process, not one per watcher.

    With many watchers of one request, rendering per watcher made each message cost a page
    render times the watchers (measured: 1,000 watchers waited 10-30 s for one message).
    """
    held = _renders.get(key)
    if held is not None and held[0] == message:
        try:
            return await asyncio.shield(held[1])
        except asyncio.CancelledError:
            if not held[1].cancelled():
                raise  # this stream itself is being closed
        except Exception:  # noqa: BLE001 - the renderer's stream failed; render here instead
            pass
        return await make()
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _renders.pop(key, None)  # re-inserted last, so it is the newest when trimming
    _renders[key] = (message, future)
    while len(_renders) > _RENDERS_KEPT:
        _renders.pop(next(iter(_renders)))
    try:
        result = await make()
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited failure is not logged twice
        raise
    future.set_result(result)
    return result


def sse_response(stream: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@login_required
def request_events(request: HttpRequest, pk: int) -> StreamingHttpResponse:
    """The request page's live status (htmx SSE)."""
    req = get_object_or_404(selectors.requests_of(request.user), pk=pk)
    job = selectors.request_job(req)
    channels = [request_channel(req.pk)] + ([job_channel(job.pk)] if job else [])

    token = get_token(request)
    done = req.is_final

    @in_thread
    def render_shared() -> tuple[str, bool]:
        # Nothing of the watcher goes in, so every watcher can be sent this one render.
        fresh = ProvisioningRequest.objects.select_related("template", "host", "guest").get(pk=pk)
        context = {**selectors.request_status(fresh), "csrf_token": _CSRF_SLOT}
        html = render_to_string("provisioning/request_detail.html#request-status", context)
        return html, fresh.is_final

    async def render(message: bytes | None) -> list[tuple[str, str]]:
        nonlocal done
        if message is None:
            html, done = await render_shared()  # on connecting: the state right now
        else:
            html, done = await _render_once(f"request:{pk}", message, render_shared)
        return [("status", html.replace(_CSRF_SLOT, token))]

    async def final() -> bool:
        return done

    return sse_response(sse_stream(channels, render, final=final))


@login_required
def guest_events(request: HttpRequest, uuid: str) -> StreamingHttpResponse:
    """The guest page's live state, actions and jobs (htmx SSE)."""
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)

    @in_thread
    def render(_message: bytes | None) -> list[tuple[str, str]]:
        fresh = Guest.objects.select_related("host", "template", "owner").get(pk=guest.pk)
        html = render_to_string(
            "provisioning/guest_detail.html#guest-status",
            selectors.guest_status(fresh),
            request=request,
        )
        return [("status", html)]

    return sse_response(sse_stream([guest_channel(guest.uuid)], render))


@login_required
def dashboard_events(request: HttpRequest) -> StreamingHttpResponse:
    """Live state badges for the dashboard's guest rows."""
    owner_id = None if request.user.is_staff else int(request.user.pk or 0)
    channel = GUESTS if owner_id is None else owner_channel(owner_id)
    last: dict[str, str] = {}

    @in_thread
    def render(_message: bytes | None) -> list[tuple[str, str]]:
        # Every row on connecting (the page may be older than the stream), then only rows whose
        # state changed since the last look.
        changed: list[tuple[str, str]] = []
        for uuid, state, reason, display, addresses in selectors.guest_badges(owner_id=owner_id):
            key = f"{state}/{reason}"
            if last.get(uuid) != key:
                last[uuid] = key
                changed.append((f"guest-{uuid}", rows.state_badge(state, reason, display)))
            shown = " ".join(addresses)
            if last.get(f"addr-{uuid}", "") != shown:
                last[f"addr-{uuid}"] = shown
                changed.append((f"addr-{uuid}", rows.address_list(addresses)))
        return changed

    return sse_response(sse_stream([channel], render))
