"""WebSocket consumers of the browser consoles: thin, the bridges in services do the work.

The URL names the guest and the console; the query string carries the one-time token the page
minted. Every refusal accepts the socket and closes it at once with a code and a reason (a
handshake refused outright reaches the page only as code 1006), before any guest byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from provisioning.services import console_bridge
from provisioning.services.consoles import ConsoleRefused

STOP_TIMEOUT = 15.0


class _ConsoleConsumer(AsyncWebsocketConsumer):
    kind = ""
    bridge_class: type[console_bridge.SerialBridge] | type[console_bridge.DisplayBridge]

    async def connect(self) -> None:
        self.bridge: console_bridge.SerialBridge | console_bridge.DisplayBridge | None = None
        self.task: asyncio.Task[None] | None = None
        await self.accept(self.subprotocol())
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        client = self.scope.get("client") or ("", 0)
        try:
            opened = await console_bridge.redeem_token(
                token=(query.get("token") or [""])[0],
                guest_uuid=str(self.scope["url_route"]["kwargs"]["uuid"]),
                kind=self.kind,
                user=self.scope.get("user"),
                client=str(client[0] or ""),
            )
        except ConsoleRefused as refused:
            await self.close(code=refused.code, reason=refused.reason)
            return
        self.bridge = self.bridge_class(
            opened, send_bytes=self._send_bytes, send_text=self._send_text, close=self._close
        )
        self.task = asyncio.create_task(self.bridge.run())

    def subprotocol(self) -> str | None:
        return None

    async def _send_bytes(self, data: bytes) -> None:
        await self.send(bytes_data=data)

    async def _send_text(self, text: str) -> None:
        await self.send(text_data=text)

    async def _close(self, code: int, reason: str) -> None:
        await self.close(code=code, reason=reason)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.bridge is None or self.bridge.closed:
            return
        data = bytes_data if bytes_data is not None else (text_data or "").encode()
        await self.bridge.write(data)

    async def disconnect(self, code: int) -> None:
        if self.bridge is not None:
            self.bridge.stop(f"closed by the viewer (code {code})")
        if self.task is not None:
            # The bridge ends by itself once stopped, noting the session's end; cancel only one
            # that hangs (a libvirt call that does not return).
            try:
                await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task


class SerialConsumer(_ConsoleConsumer):
    """The serial terminal: xterm.js's input as binary frames in, console output out."""

    kind = "serial"
    bridge_class = console_bridge.SerialBridge


class DisplayConsumer(_ConsoleConsumer):
    """The VNC display for noVNC, which asks for the "binary" subprotocol."""

    kind = "graphics"
    bridge_class = console_bridge.DisplayBridge

    def subprotocol(self) -> str | None:
        offered: list[Any] = self.scope.get("subprotocols") or []
        return "binary" if "binary" in offered else None
