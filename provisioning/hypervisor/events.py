"""Domain lifecycle events from libvirt, delivered to a callback by a self-repairing listener.

Events are the fast path, not the truth: any event can be missed while the connection is down,
so when ``on_state(True)`` reports a (re)connection, re-read the guests you care about. A
STOPPED event can be half of a reboot; confirm with the domain's state and reason.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import libvirt

from .connection import (
    close_quietly,
    enable_keepalive,
    event_loop_running,
    open_connection,
    probe,
)
from .errors import HypervisorError
from .types import constant_names

log = logging.getLogger(__name__)

__all__ = ["EventListener", "LifecycleEvent", "detail_name", "event_name"]

EVENT_NAMES: dict[int, str] = constant_names(
    "VIR_DOMAIN_EVENT_",
    (
        "DEFINED",
        "UNDEFINED",
        "STARTED",
        "SUSPENDED",
        "RESUMED",
        "STOPPED",
        "SHUTDOWN",
        "PMSUSPENDED",
        "CRASHED",
    ),
)

DETAIL_NAMES: dict[int, dict[int, str]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: constant_names(
        "VIR_DOMAIN_EVENT_DEFINED_", ("ADDED", "UPDATED", "RENAMED", "FROM_SNAPSHOT")
    ),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: constant_names(
        "VIR_DOMAIN_EVENT_UNDEFINED_", ("REMOVED", "RENAMED")
    ),
    libvirt.VIR_DOMAIN_EVENT_STARTED: constant_names(
        "VIR_DOMAIN_EVENT_STARTED_",
        ("BOOTED", "MIGRATED", "RESTORED", "FROM_SNAPSHOT", "WAKEUP", "RECREATED"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: constant_names(
        "VIR_DOMAIN_EVENT_SUSPENDED_",
        (
            "PAUSED",
            "MIGRATED",
            "IOERROR",
            "WATCHDOG",
            "RESTORED",
            "FROM_SNAPSHOT",
            "API_ERROR",
            "POSTCOPY",
            "POSTCOPY_FAILED",
        ),
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: constant_names(
        "VIR_DOMAIN_EVENT_RESUMED_",
        ("UNPAUSED", "MIGRATED", "FROM_SNAPSHOT", "POSTCOPY", "POSTCOPY_FAILED"),
    ),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: constant_names(
        "VIR_DOMAIN_EVENT_STOPPED_",
        ("SHUTDOWN", "DESTROYED", "CRASHED", "MIGRATED", "SAVED", "FAILED", "FROM_SNAPSHOT"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: constant_names(
        "VIR_DOMAIN_EVENT_SHUTDOWN_", ("FINISHED", "GUEST", "HOST")
    ),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: constant_names(
        "VIR_DOMAIN_EVENT_PMSUSPENDED_", ("MEMORY", "DISK")
    ),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: constant_names(
        "VIR_DOMAIN_EVENT_CRASHED_", ("PANICKED", "CRASHLOADED")
    ),
}


def event_name(event: int) -> str:
    """'started', 'stopped', ... for a raw lifecycle event number."""
    return EVENT_NAMES.get(event, f"event-{event}")


def detail_name(event: int, detail: int) -> str:
    """'booted', 'shutdown', 'destroyed', ... for a raw (event, detail) pair."""
    return DETAIL_NAMES.get(event, {}).get(detail, f"detail-{detail}")


@dataclass(frozen=True)
class LifecycleEvent:
    """One domain lifecycle event (event='reboot' for a guest-initiated reboot, 'agent' with
    detail 'connected' or 'gone' when the guest agent comes or goes)."""

    uri: str
    uuid: str
    name: str
    event: str
    detail: str
    timestamp: datetime


Callback = Callable[[LifecycleEvent], object]
StateCallback = Callable[[bool], object]


@dataclass(frozen=True)
class _Closed:
    generation: int


_STOP = object()


class EventListener:
    """A thread that keeps a connection to uri, hands lifecycle events to callback, reconnects.

    The callback runs in the listener's own thread, never in libvirt's event loop thread, so a
    slow callback cannot stall keepalive for the process's other connections. Exceptions from
    callback and on_state are logged and the listener goes on.
    """

    def __init__(
        self,
        uri: str,
        callback: Callback,
        *,
        on_state: StateCallback | None = None,
        readonly: bool = True,
        probe_interval: float = 5.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        self.uri = uri
        self.readonly = readonly
        self.probe_interval = probe_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._callback = callback
        self._on_state = on_state
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._reported: bool | None = None
        self._generations = itertools.count(1)
        self._generation = 0
        self.connects = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"libvirt-events {uri}", daemon=True)

    def __enter__(self) -> EventListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while subscribed on a live connection."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or timeout; returns connected."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Start listening in the background."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Unsubscribe, close the connection and join the thread."""
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the listener thread runs."""
        return self._thread.is_alive()

    # --- the listener thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.min_backoff
        while not self._stopping.is_set():
            try:
                conn, callback_ids = self._connect()
            except (HypervisorError, libvirt.libvirtError) as exc:
                self.last_error = str(exc)
                log.warning("event listener cannot connect to %s: %s", self.uri, exc)
                self._report(False)
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            self.connects += 1
            self._connected.set()
            self._report(True)
            try:
                self._serve(conn)
            finally:
                self._connected.clear()
                self._disconnect(conn, callback_ids)
            self._report(False)
        self._connected.clear()

    def _connect(self) -> tuple[libvirt.virConnect, list[int]]:
        conn = open_connection(self.uri, readonly=self.readonly)
        if not event_loop_running():
            close_quietly(conn)
            raise HypervisorError(
                "no libvirt event loop in this process (forked with connections open)"
            )
        self._generation = generation = next(self._generations)
        enable_keepalive(conn)
        try:
            conn.registerCloseCallback(self._on_close, generation)
        except libvirt.libvirtError as exc:
            log.debug("no close callback on %s, probing instead: %s", self.uri, exc)
        try:
            callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None
                ),
            ]
        except libvirt.libvirtError:
            close_quietly(conn)
            raise
        try:
            callback_ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent, None
                )
            )
        except libvirt.libvirtError as exc:
            log.info("no guest agent events from %s: %s", self.uri, exc)
        return conn, callback_ids

    def _disconnect(self, conn: libvirt.virConnect, callback_ids: list[int]) -> None:
        for callback_id in callback_ids:
            # A dead connection forgets its callbacks anyway.
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        close_quietly(conn)

    def _serve(self, conn: libvirt.virConnect) -> None:
        """Deliver events until stopped or the connection is found dead."""
        generation = self._generation
        next_probe = time.monotonic() + self.probe_interval
        while True:
            wait = max(0.0, next_probe - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, _Closed) and item.generation == generation:
                self.last_error = "connection closed"
                log.warning("event listener lost its connection to %s", self.uri)
                return
            if isinstance(item, LifecycleEvent):
                self._deliver(item)
            if time.monotonic() >= next_probe:
                if not probe(conn):
                    self.last_error = "connection stopped answering"
                    log.warning("event listener's connection to %s stopped answering", self.uri)
                    return
                next_probe = time.monotonic() + self.probe_interval

    def _deliver(self, event: LifecycleEvent) -> None:
        try:
            self._callback(event)
        except Exception:
            log.exception("event callback failed for %s", event)

    def _report(self, connected: bool) -> None:
        if self._reported is connected:
            return
        self._reported = connected
        if self._on_state is None:
            return
        try:
            self._on_state(connected)
        except Exception:
            log.exception("event listener on_state callback failed")

    # --- libvirt's event loop thread: only enqueue ---------------------------------------

    def _on_close(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        log.debug("libvirt closed the listener connection to %s (reason %s)", self.uri, reason)
        self._queue.put(_Closed(generation))

    def _event(self, dom: libvirt.virDomain, event: str, detail: str) -> LifecycleEvent:
        return LifecycleEvent(
            uri=self.uri,
            uuid=dom.UUIDString(),
            name=dom.name(),
            event=event,
            detail=detail,
            timestamp=datetime.now(UTC),
        )

    def _on_lifecycle(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: int,
        detail: int,
        _opaque: object,
    ) -> None:
        try:
            self._queue.put(self._event(dom, event_name(event), detail_name(event, detail)))
        except Exception:
            log.exception("could not read a lifecycle event from %s", self.uri)

    def _on_agent(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        state: int,
        _reason: int,
        _opaque: object,
    ) -> None:
        connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
        try:
            self._queue.put(self._event(dom, "agent", "connected" if connected else "gone"))
        except Exception:
            log.exception("could not read an agent event from %s", self.uri)

    def _on_reboot(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, _opaque: object
    ) -> None:
        try:
            self._queue.put(self._event(dom, "reboot", ""))
        except Exception:
            log.exception("could not read a reboot event from %s", self.uri)
