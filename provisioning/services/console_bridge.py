"""Bridges between a browser's console WebSocket and a guest's console, on the web server's loop.

``SerialBridge`` joins one viewer to a guest's serial console (``hypervisor.consoles``): output
as binary frames, status as JSON text frames, input back to the guest. It starts with the serial
log as scrollback and follows the guest: paused, stopped (it waits and re-attaches when the
guest runs again) and moved to another host by a migration. A newer viewer takes the console
over; the older one is told so and closed. ``DisplayBridge`` relays the bytes of the guest's
VNC display for noVNC. Both close after CONSOLE_IDLE_SECONDS without input and note the end on
the guest's console history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from provisioning.hypervisor import HypervisorError, Unsupported
from provisioning.hypervisor.consoles import SerialConsole, open_display
from provisioning.services import consoles
from provisioning.services.consoles import Opened

log = logging.getLogger(__name__)

SendBytes = Callable[[bytes], Awaitable[None]]
SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]
TICK = 1.0  # how often a waiting bridge looks at the guest, and idle time is checked
TAKEOVER_GRACE = 1.5  # a stream that fails while the guest still runs, for this long: taken over
# The console ends (EOF) as the emulator quits; libvirt marks the domain shut off a second or two
# later. Until it does (or for this long at most) the bridge waits without re-attaching.
STOPPING_FOR = 30.0
_LONE_LF = re.compile(rb"(?<!\r)\n")

# The serial bridge attached to each guest in this process: a newer one marks the older.
_attached: dict[str, SerialBridge] = {}


def _db(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run a database call in a worker thread and give its connection back afterwards.

    A console lives for minutes or hours: holding a database connection all that time would run
    PostgreSQL out of them with many viewers (as the event streams found).
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                connection.close()

    return sync_to_async(run, thread_sensitive=False)


redeem_token = _db(consoles.redeem_token)
_session_ended = _db(consoles.session_ended)
_guest_host_uri = _db(consoles.guest_host_uri)


def scrollback(guest_uuid: str) -> bytes:
    """The end of the guest's serial log, as terminal bytes (CRLF line ends)."""
    text = consoles.console_tail(guest_uuid, max_bytes=settings.CONSOLE_SCROLLBACK_BYTES)
    return _LONE_LF.sub(b"\r\n", text.encode())


class _Bridge:
    def __init__(self, opened: Opened, *, send_text: SendText, close: Close) -> None:
        self.opened = opened
        self._send_text = send_text
        self._close = close
        self.last_input = time.monotonic()
        self.closed = False
        self.end_reason = "closed by the viewer"

    async def status(self, state: str, message: str) -> None:
        await self._send_text(json.dumps({"type": "status", "state": state, "message": message}))

    async def finish(self, code: int, reason: str) -> None:
        """Close the viewer's socket with a code and reason (once)."""
        if not self.closed:
            self.closed = True
            self.end_reason = reason
            await self._close(code, reason)

    def stop(self, reason: str) -> None:
        """The viewer went away: send nothing more, and let ``run`` end soon."""
        if not self.closed:
            self.closed = True
            self.end_reason = reason
        self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def idle(self) -> bool:
        return time.monotonic() - self.last_input > settings.CONSOLE_IDLE_SECONDS

    async def close_idle(self) -> None:
        minutes = settings.CONSOLE_IDLE_SECONDS / 60
        await self.finish(consoles.IDLE, f"closed after {minutes:g} minutes without input")


class SerialBridge(_Bridge):
    """One viewer's serial terminal on a guest; ``run`` until the viewer or the bridge closes."""

    def __init__(
        self, opened: Opened, *, send_bytes: SendBytes, send_text: SendText, close: Close
    ) -> None:
        super().__init__(opened, send_text=send_text, close=close)
        self._send_bytes = send_bytes
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._console: SerialConsole | None = None
        self.state = opened.state
        self.taken_over = False
        self._stopping_since = 0.0

    def _wake(self) -> None:
        self._events.put_nowait(("stop", None))

    # Called on libvirt's event-loop thread: hand over to this loop, nothing else.
    def _from_libvirt(self, loop: asyncio.AbstractEventLoop, kind: str) -> Callable[[Any], None]:
        def put(value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late event
                loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

        return put

    def _new_console(self, uri: str) -> SerialConsole:
        loop = asyncio.get_running_loop()
        return SerialConsole(
            uri,
            self.opened.guest_uuid,
            on_output=self._from_libvirt(loop, "output"),
            on_state=self._from_libvirt(loop, "state"),
            on_end=self._from_libvirt(loop, "end"),
        )

    async def write(self, data: bytes) -> None:
        """Input from the viewer; dropped while the guest is paused or the console detached."""
        self.last_input = time.monotonic()
        console = self._console
        if console is not None and console.attached and self.state == "running":
            # A non-blocking stream: the call hands the bytes on and returns (a thread hop
            # here cost more than the write, measured in keystroke-to-echo time).
            console.write(data)

    async def run(self) -> None:
        try:
            await self._run()
        except HypervisorError as exc:
            await self.finish(
                consoles.UNAVAILABLE, f"the console is unavailable: {exc.message}"[:120]
            )
        finally:
            if _attached.get(self.opened.guest_uuid) is self:
                del _attached[self.opened.guest_uuid]
            if self._console is not None:
                await asyncio.to_thread(self._console.close)
            await _session_ended(self.opened.session_id, self.end_reason)

    async def _run(self) -> None:
        history = await asyncio.to_thread(scrollback, self.opened.guest_uuid)
        if history:
            await self._send_bytes(history)
        self._console = self._new_console(self.opened.host_uri)
        self.state = await asyncio.to_thread(self._console.connect)
        await self._attach_if_up()
        while not self.closed:
            try:
                kind, value = await asyncio.wait_for(self._events.get(), TICK)
            except TimeoutError:
                await self._tick()
                continue
            if kind == "output":
                await self._send_bytes(value)
            elif kind == "state":
                await self._moved_to(value)
            elif kind == "end":
                await self._stream_ended(value)

    async def _attach_if_up(self) -> None:
        console = self._console
        assert console is not None
        if self.state not in ("running", "paused"):
            await self.status(
                "stopped",
                f"{self.opened.guest_name} is not running; this terminal connects when it runs.",
            )
            return
        previous = _attached.get(self.opened.guest_uuid)
        if previous is not None and previous is not self:
            previous.taken_over = True
        _attached[self.opened.guest_uuid] = self
        try:
            await asyncio.to_thread(console.attach)
        except Unsupported:
            raise  # this host has no consoles to give: the bridge closes, saying so
        except HypervisorError as exc:
            # Lost a race with libvirt: the guest stopped again, or it is starting and its pty
            # is not assigned yet ("PTY device is not yet assigned"). The tick tries again.
            log.info("console of %s: not attached yet: %s", self.opened.guest_uuid, exc)
            return
        await self._say_state()

    async def _say_state(self) -> None:
        if self.state == "paused":
            await self.status("paused", f"{self.opened.guest_name} is paused; resume it to type.")
        else:
            await self.status("running", f"Connected to {self.opened.guest_name}'s serial console.")

    async def _moved_to(self, state: str) -> None:
        console = self._console
        assert console is not None
        if state == self.state or (self.state == "stopping" and state not in ("running", "paused")):
            self.state = state
            return
        self.state = state
        if state in ("running", "paused"):
            if console.attached:
                await self._say_state()
            else:
                await self._attach_if_up()
        else:
            await asyncio.to_thread(console.detach)
            await self.status(
                "stopped",
                f"{self.opened.guest_name} stopped; this terminal reconnects when it runs again.",
            )

    async def _stream_ended(self, why: str) -> None:
        console = self._console
        assert console is not None
        if self.taken_over:
            await self._taken_over()
            return
        if why == "eof":
            # The emulator closed the console: the guest is stopping (destroyed, shut down, or
            # its migration ended on this host). The state follows shortly.
            self.state = "stopping"
            self._stopping_since = time.monotonic()
            await self.status(
                "stopped",
                f"{self.opened.guest_name} stopped; this terminal reconnects when it runs again.",
            )
            return
        # A stream that fails is one another viewer (maybe `virsh console --force` elsewhere)
        # took over, unless the guest stopped meanwhile.
        deadline = time.monotonic() + TAKEOVER_GRACE
        while (left := deadline - time.monotonic()) > 0:
            try:
                kind, value = await asyncio.wait_for(self._events.get(), left)
            except TimeoutError:
                break
            if kind == "output":
                await self._send_bytes(value)
            elif kind == "state":
                await self._moved_to(value)
                if value not in ("running", "paused"):
                    return
        state = await asyncio.to_thread(console.state)
        if state not in ("running", "paused"):
            await self._moved_to(state)
            return
        await self._taken_over()

    async def _taken_over(self) -> None:
        await self.finish(consoles.TAKEN_OVER, "another console session took over this console")

    async def _tick(self) -> None:
        if self.idle():
            await self.close_idle()
            return
        console = self._console
        if console is None or console.attached:
            return
        # Waiting for the guest: it may run again here, or on another host after a migration.
        uri = await _guest_host_uri(self.opened.guest_id)
        if uri is not None and uri != console.uri:
            await asyncio.to_thread(console.close)
            self._console = console = self._new_console(uri)
            self.state = await asyncio.to_thread(console.connect)
            await self._attach_if_up()
            return
        state = await asyncio.to_thread(console.state)
        stopping = self.state == "stopping" and state in ("running", "paused")
        if stopping and time.monotonic() - self._stopping_since < STOPPING_FOR:
            return  # libvirt has not marked it shut off yet
        if state != self.state:
            await self._moved_to(state)
        elif state in ("running", "paused"):
            await self._attach_if_up()  # an attach that failed as the guest started


class DisplayBridge(_Bridge):
    """One viewer's VNC display: RFB bytes both ways between noVNC and the guest's display."""

    def __init__(
        self, opened: Opened, *, send_bytes: SendBytes, send_text: SendText, close: Close
    ) -> None:
        super().__init__(opened, send_text=send_text, close=close)
        self._send_bytes = send_bytes
        self._writer: asyncio.StreamWriter | None = None

    def _wake(self) -> None:
        if self._writer is not None:
            self._writer.close()  # the pump reads the end at once

    async def write(self, data: bytes) -> None:
        self.last_input = time.monotonic()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def run(self) -> None:
        try:
            sock = await asyncio.to_thread(
                open_display, self.opened.host_uri, self.opened.guest_uuid
            )
            reader, self._writer = await asyncio.open_connection(sock=sock)
            await self._pump(reader)
        except HypervisorError as exc:
            await self.finish(
                consoles.UNAVAILABLE, f"the display is unavailable: {exc.message}"[:120]
            )
        except OSError as exc:
            await self.finish(consoles.UNAVAILABLE, f"the display is unavailable: {exc}"[:120])
        finally:
            if self._writer is not None:
                self._writer.close()
                with contextlib.suppress(OSError):
                    await self._writer.wait_closed()
            await _session_ended(self.opened.session_id, self.end_reason)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while not self.closed:
            try:
                data = await asyncio.wait_for(reader.read(256 * 1024), TICK)
            except TimeoutError:
                if self.idle():
                    await self.close_idle()
                continue
            if not data:
                if self.closed:
                    return
                await self.finish(
                    consoles.NOT_RUNNING, f"{self.opened.guest_name}'s display closed (it stopped)"
                )
                return
            await self._send_bytes(data)
