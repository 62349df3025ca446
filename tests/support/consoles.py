"""Console WebSockets driven in this process through Channels' communicator (no web server).

The consumers run on this test's event loop against the real ASGI application, so a test can
count what the process holds (file descriptors, tasks, libvirt console sessions) around them.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from asgiref.testing import ApplicationCommunicator
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from provisioning.models import ConsoleSession, Guest
from provisioning.services import consoles

HOST = "127.0.0.1:8000"
ORIGIN = f"http://{HOST}"


def session_cookie(user: AbstractBaseUser) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def token_for(guest: Guest, user: Any, kind: str = "serial") -> str:
    return consoles.mint_token(guest=guest, user=user, kind=kind)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Viewer:
    """One console WebSocket: what it received, split into bytes, status messages and the close."""

    def __init__(
        self,
        application: Any,
        guest_uuid: object,
        token: str,
        *,
        kind: str = "serial",
        cookie: str | None = None,
        origin: str | None = ORIGIN,
        host: str = HOST,
    ) -> None:
        headers = [(b"host", host.encode())]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        if cookie is not None:
            headers.append((b"cookie", cookie.encode()))
        scope = {
            "type": "websocket",
            "path": f"/ws/guests/{guest_uuid}/console/{kind}",
            "query_string": f"token={token}".encode(),
            "headers": headers,
            "subprotocols": ["binary"] if kind == "graphics" else [],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        self.comm = ApplicationCommunicator(application, scope)
        self.output = bytearray()
        self.statuses: list[dict[str, Any]] = []
        self.close: tuple[int, str] | None = None

    async def connect(self) -> bool:
        """Open the socket: True when the server accepted it."""
        await self.comm.send_input({"type": "websocket.connect"})
        first = await self.comm.receive_output(10)
        if first["type"] == "websocket.close":
            self.close = (first.get("code", 1000), first.get("reason", ""))
        return bool(first["type"] == "websocket.accept")

    async def _one(self, timeout: float) -> bool:
        """Take one message; False when nothing came in `timeout`."""
        try:
            message = await asyncio.wait_for(self.comm.output_queue.get(), timeout)
        except TimeoutError:
            return False
        if message["type"] == "websocket.close":
            self.close = (message.get("code", 1000), message.get("reason", ""))
        elif message.get("bytes") is not None:
            self.output.extend(message["bytes"])
        elif message.get("text") is not None:
            data = json.loads(message["text"])
            if data.get("type") == "status":
                self.statuses.append(data)
        return True

    async def until(
        self, predicate: Callable[[Viewer], bool], *, timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.close is not None:
                raise AssertionError(f"closed {self.close} while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; statuses {self.statuses}, "
                    f"output tail {bytes(self.output[-300:])!r}"
                )
            await self._one(left)

    async def closed(self, *, timeout: float = 10) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.close is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not closed within {timeout} s; statuses {self.statuses}")
            await self._one(left)
        return self.close

    def state(self) -> str | None:
        return self.statuses[-1]["state"] if self.statuses else None

    async def type(self, text: str) -> None:
        await self.comm.send_input({"type": "websocket.receive", "bytes": text.encode()})

    async def leave(self) -> None:
        """Close from the viewer's side and wait for the application to finish."""
        await self.comm.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.comm.wait(10)


def history(guest: Guest) -> list[ConsoleSession]:
    return list(guest.console_sessions.filter(opened__isnull=False).order_by("opened"))


def run_async(make: Callable[[], Any]) -> Any:
    """Run the coroutine `make()` returns on an event loop of its own, in a thread of its own.

    A test process that drove Chromium already has Playwright's loop running in its main
    thread, where asyncio.run() refuses to start another.
    """
    result: dict[str, Any] = {}

    def main() -> None:
        try:
            result["value"] = asyncio.run(make())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=main, name="console-test-loop")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")
