"""Guest consoles: the serial console as a non-blocking libvirt stream, the display as a socket.

A ``SerialConsole`` is one viewer's session on one domain's serial console. It holds a libvirt
connection of its own, so closing it frees everything libvirt gave it. Its stream is opened with
``VIR_DOMAIN_CONSOLE_FORCE``: a newer session takes the console over, and libvirt ends the stream
of the one before. Stream and lifecycle callbacks run on libvirt's event-loop thread (see
``connection.ensure_event_loop``). They only hand the data on: the ``on_output``, ``on_state`` and
``on_end`` callbacks must not block; pass what they get to your own loop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import libvirt
from lxml import etree

from .connection import close_quietly, open_connection
from .errors import NotFound, Unsupported, WrongState, translating

log = logging.getLogger(__name__)

__all__ = [
    "SerialConsole",
    "display_address",
    "display_of",
    "is_local_uri",
    "open_display",
    "open_serial_consoles",
]

READ_CHUNK = 64 * 1024
_READ_EVENTS = (
    libvirt.VIR_STREAM_EVENT_READABLE
    | libvirt.VIR_STREAM_EVENT_ERROR
    | libvirt.VIR_STREAM_EVENT_HANGUP
)
# Lifecycle event -> what a console viewer is told.
_STATE_OF_EVENT = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
}
_LIVE_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}


class _Inert:
    """Stands in for a stream whose callback was removed (see ``_watch_stream``)."""

    def _dispatchStreamEventCallback(self, _events: int, _data: object) -> int:
        return 0


_INERT = _Inert()


def _watch_stream(stream: libvirt.virStream, callback: Callable[..., None]) -> dict[str, object]:
    """``stream.eventAddCallback``, keeping the callback's data where we can reach it.

    libvirt-python's callback data holds the stream, and removing the callback does not let go
    of that data: every console session kept its stream, and through it its connection and
    socket, for good (measured: two file descriptors per session). Holding the data ourselves
    lets ``_unwatch_stream`` cut that link, so the stream and its connection are freed.
    """
    data: dict[str, object] = {"stream": stream, "cb": callback, "opaque": None}
    # libvirt-python's own C module, which eventAddCallback calls with its data.
    if libvirt.libvirtmod.virStreamEventAddCallback(stream._o, _READ_EVENTS, data) == -1:
        raise libvirt.libvirtError("virStreamEventAddCallback() failed")
    return data


def _unwatch_stream(stream: libvirt.virStream, data: dict[str, object]) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        stream.eventRemoveCallback()
    # A dispatch already under way reads these: an inert stand-in, never a missing key.
    data["stream"] = _INERT
    data["cb"] = None


_open_lock = threading.Lock()
_open: set[SerialConsole] = set()


def open_serial_consoles() -> int:
    """How many SerialConsole sessions this process holds open (their connections included)."""
    with _open_lock:
        return len(_open)


class SerialConsole:
    """One session on a domain's serial console, re-attachable when the domain starts again.

    ``on_output(data)`` gets the console's bytes; ``on_state(state)`` gets "running", "paused",
    "stopped" or "undefined" as the domain moves; ``on_end(why)`` is called once when the stream
    ends by itself ("eof", "hangup" or "error"): the domain stopped, or another session took over.
    """

    def __init__(
        self,
        uri: str,
        uuid: str,
        *,
        on_output: Callable[[bytes], None],
        on_state: Callable[[str], None],
        on_end: Callable[[str], None],
    ) -> None:
        self.uri = uri
        self.uuid = uuid
        self._on_output = on_output
        self._on_state = on_state
        self._on_end = on_end
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self._event_id: int | None = None
        self._stream: libvirt.virStream | None = None
        self._watch: dict[str, object] = {}
        self._pending = b""  # input the stream could not take yet

    def connect(self) -> str:
        """Open the connection and watch the domain; returns its state ("running", ...)."""
        conn = open_connection(self.uri)
        try:
            with translating():
                dom = conn.lookupByUUIDString(self.uuid)
                self._event_id = conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                )
        except BaseException:
            close_quietly(conn)
            raise
        with self._lock:
            self._conn, self._dom = conn, dom
        with _open_lock:
            _open.add(self)
        return self.state()

    def state(self) -> str:
        """The domain's state now: "running", "paused", "stopped" or "undefined"."""
        dom = self._dom
        if dom is None:
            return "undefined"
        try:
            with translating():
                state, _reason = dom.state()
        except NotFound:
            return "undefined"
        return _LIVE_STATES.get(state, "stopped")

    def attach(self) -> None:
        """Open the console stream (the domain must be running or paused); takes it over."""
        with self._lock:
            conn, dom = self._conn, self._dom
            if conn is None or dom is None:
                raise WrongState("the console session is closed")
            self._drop_stream()
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                with translating():
                    dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
                    self._watch = _watch_stream(stream, self._stream_event)
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
            self._stream = stream
            self._pending = b""

    @property
    def attached(self) -> bool:
        return self._stream is not None

    def write(self, data: bytes) -> None:
        """Send input to the console; what the stream cannot take now goes when it can."""
        with self._lock:
            if self._stream is None:
                return
            self._pending += data
            self._flush()

    def detach(self) -> None:
        """Close the console stream, keep watching the domain."""
        with self._lock:
            self._drop_stream()

    def close(self) -> None:
        """Close the stream, stop watching, close the connection. Safe to call twice."""
        with self._lock:
            self._drop_stream()
            conn, self._conn, self._dom = self._conn, None, None
            event_id, self._event_id = self._event_id, None
        if conn is not None:
            if event_id is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(event_id)
            close_quietly(conn)
        with _open_lock:
            _open.discard(self)

    # -- on libvirt's event-loop thread --------------------------------------------------

    def _lifecycle(
        self,
        _conn: libvirt.virConnect,
        _dom: libvirt.virDomain,
        event: int,
        _detail: int,
        _o: object,
    ) -> None:
        state = _STATE_OF_EVENT.get(event)
        if state is not None:
            self._on_state(state)

    def _stream_event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        ended: str | None = None
        with self._lock:
            if stream is not self._stream:
                return  # an old stream's last event
            if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
                self._flush()
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                ended = self._read(stream)
            if ended is None and events & libvirt.VIR_STREAM_EVENT_ERROR:
                ended = "error"
            if ended is None and events & libvirt.VIR_STREAM_EVENT_HANGUP:
                ended = "hangup"
            if ended is not None:
                self._drop_stream()
        if ended is not None:
            self._on_end(ended)

    def _read(self, stream: libvirt.virStream) -> str | None:
        while True:
            try:
                data = stream.recv(READ_CHUNK)
            except libvirt.libvirtError as exc:
                log.debug("console stream of %s failed: %s", self.uuid, exc)
                return "error"
            if data == -2:
                return None  # nothing more for now
            if not data:
                return "eof"
            assert isinstance(data, bytes)
            self._on_output(data)

    # -- with self._lock held ------------------------------------------------------------

    def _flush(self) -> None:
        stream = self._stream
        while stream is not None and self._pending:
            try:
                sent = stream.send(self._pending)
            except libvirt.libvirtError as exc:
                log.debug("writing to the console of %s failed: %s", self.uuid, exc)
                self._pending = b""
                return
            if sent == -2:
                break
            self._pending = self._pending[sent:]
        if stream is not None:
            wanted = _READ_EVENTS | (libvirt.VIR_STREAM_EVENT_WRITABLE if self._pending else 0)
            with contextlib.suppress(libvirt.libvirtError):
                stream.eventUpdateCallback(wanted)

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        watch, self._watch = self._watch, {}
        self._pending = b""
        if stream is not None:
            _unwatch_stream(stream, watch)
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()


def is_local_uri(uri: str) -> bool:
    """True when the URI reaches a libvirtd on this machine through its UNIX socket."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return not parts.hostname and transport in ("", "unix")


def display_address(uri: str, uuid: str) -> tuple[str, int]:
    """Where the running domain's VNC display listens: (address, port), from its live XML."""
    conn = open_connection(uri, readonly=True)
    try:
        with translating():
            xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
    finally:
        close_quietly(conn)
    return display_of(xml, uri)


def display_of(xml: str, uri: str) -> tuple[str, int]:
    """The (address, port) a portal on another machine reaches a domain's VNC display at."""
    root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is None:
        raise Unsupported("the guest has no VNC display")
    port = int(graphics.get("port") or -1)
    if port <= 0:
        raise WrongState("the guest's display has no port (is it running?)")
    listen = graphics.get("listen") or ""
    if listen in ("", "0.0.0.0", "::"):
        listen = urlsplit(uri).hostname or "127.0.0.1"
    elif listen in ("127.0.0.1", "::1", "localhost") and not is_local_uri(uri):
        raise Unsupported(
            "the display listens on the host's loopback and the host is remote: "
            "give the host a display address the portal can reach"
        )
    return listen, port


def open_display(uri: str, uuid: str, *, timeout: float = 5.0) -> socket.socket:
    """A connected socket to the running domain's VNC display, speaking RFB from its first byte.

    Local hosts hand over the display's socket through libvirt (``openGraphicsFD``, no TCP and
    no VNC password); remote ones are reached by TCP at the display's address.
    """
    if is_local_uri(uri):
        conn = open_connection(uri)
        try:
            with translating():
                dom = conn.lookupByUUIDString(uuid)
                state, _reason = dom.state()
                if state not in _LIVE_STATES:
                    raise WrongState("the guest is not running")
                fd = dom.openGraphicsFD(0, libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
        finally:
            close_quietly(conn)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock
    address, port = display_address(uri, uuid)
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setblocking(False)
    return sock
