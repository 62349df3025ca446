"""Connections to libvirt: lazily opened, cached per process, repaired when they break.

Fork safety (Celery prefork): a libvirt connection is a socket plus client state, and a forked
child that used or even closed its parent's connection would talk over the parent's socket. So
the cache is keyed by pid and a ``Hypervisor`` notices when it runs in a new process: it then
opens its own connection and keeps the parent's object referenced forever, because letting it
be garbage collected would call virConnectClose and tear down the parent's session.

The event loop: keepalive and close callbacks (and events) need libvirt's default event loop,
registered before the first connection opens and run by a thread. ``ensure_event_loop`` does
that once per process, again in a forked child (threads do not survive fork).

In a forked child every connection inherited from the parent is detached at fork (its Python
wrapper forgets the C handle, so neither a call nor garbage collection can reach the parent's
socket). If the parent had connections open, their sockets and keepalive timers also sit in the
child's copy of the event loop, where running it would read and write the parent's sockets; so
such a child runs no event loop (no keepalive, no close callbacks, no events; broken connections
are still found by the probe after a failed call). Open connections only after the fork (Celery:
``worker_process_init``) to get the full behaviour in the children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
from lxml import etree

from .errors import ConnectionLost, HypervisorError, Unreachable, translating
from .types import HostInfo, format_version

log = logging.getLogger(__name__)

T = TypeVar("T")

KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

_loop_lock = threading.Lock()
_loop_pid: int | None = None
# The pid of a forked child that inherited open connections: its event loop must not run.
_loop_blocked_pid: int | None = None

_cache_lock = threading.Lock()
_cache: dict[tuple[int, str, bool], Hypervisor] = {}

# Every connection this process opened, so a forked child can detach them.
_opened: weakref.WeakSet[libvirt.virConnect] = weakref.WeakSet()


def _detach(conn: libvirt.virConnect) -> bool:
    """Make a parent's connection wrapper inert in a child; True if it was open."""
    was_open = getattr(conn, "_o", None) is not None
    # With no C handle, libvirt-python's __del__ and every call skip virConnectClose / RPCs.
    conn._o = None
    return was_open


def _reset_after_fork() -> None:
    """In a forked child: fresh locks, parent connections detached, loop blocked if needed."""
    global _loop_lock, _cache_lock, _opened, _loop_blocked_pid
    # A lock held by a parent thread at fork time would stay held forever.
    _loop_lock = threading.Lock()
    _cache_lock = threading.Lock()
    inherited_open = [_detach(conn) for conn in list(_opened)]
    _opened = weakref.WeakSet()
    if any(inherited_open) and _loop_pid is not None:
        _loop_blocked_pid = os.getpid()


os.register_at_fork(after_in_child=_reset_after_fork)


def _log_libvirt_error(_ctx: object, err: Any) -> None:
    """Send libvirt's own error reports to logging instead of stderr."""
    log.debug("libvirt: %s", err[2] if isinstance(err, (list, tuple)) and len(err) > 2 else err)


def _run_event_loop() -> None:
    """Dispatch libvirt events (keepalive, close callbacks, domain events) forever."""
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)  # a loop that keeps failing must not spin a CPU


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process."""
    global _loop_pid
    pid = os.getpid()
    if _loop_pid == pid or _loop_blocked_pid == pid:
        return
    with _loop_lock:
        if _loop_pid == pid:
            return
        # Process-wide: libvirt would otherwise print every error, even caught ones, to stderr.
        libvirt.registerErrorHandler(_log_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(
            target=_run_event_loop, name=f"libvirt-event-loop-{pid}", daemon=True
        )
        thread.start()
        _loop_pid = pid


def event_loop_running() -> bool:
    """True when this process runs libvirt's event loop."""
    return _loop_pid == os.getpid()


def open_connection(uri: str, *, readonly: bool = False) -> libvirt.virConnect:
    """Open a new connection with the event loop in place; Unreachable if that fails."""
    ensure_event_loop()
    try:
        with translating():
            conn = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except HypervisorError as exc:
        raise Unreachable(
            f"cannot connect to {uri}: {exc.message}", code=exc.code, domain=exc.domain
        ) from exc
    _opened.add(conn)
    return conn


def enable_keepalive(conn: libvirt.virConnect) -> bool:
    """Turn on keepalive; False where the driver has none (local test:///, old daemons)."""
    if not event_loop_running():
        return False  # keepalive without a running loop would drop healthy connections
    try:
        return conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) == 0
    except libvirt.libvirtError as exc:
        log.debug("keepalive not available on %s: %s", _uri_of(conn), exc)
        return False


def probe(conn: libvirt.virConnect) -> bool:
    """True if the connection answers a round trip right now."""
    try:
        if not conn.isAlive():
            return False
        conn.getLibVersion()
    except libvirt.libvirtError:
        return False
    return True


def close_quietly(conn: libvirt.virConnect) -> None:
    """Close a connection that may already be dead, ignoring what libvirt says about it."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    try:
        conn.close()
    except libvirt.libvirtError as exc:
        log.debug("closing a libvirt connection failed: %s", exc)


def _uri_of(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "?"


class Hypervisor:
    """One libvirt host: a lazily opened connection that repairs itself when it breaks."""

    def __init__(self, uri: str, readonly: bool = False):
        self.uri = uri
        self.readonly = readonly
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._suspect = False
        self._pid = os.getpid()
        self.keepalive = False
        self.close_callback = False

    def __repr__(self) -> str:
        mode = " readonly" if self.readonly else ""
        return f"<Hypervisor {self.uri}{mode}>"

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connection(self) -> libvirt.virConnect:
        """The live connection, opened now if needed, re-checked if it was seen failing."""
        with self._lock:
            self._leave_parent_connection()
            conn = self._conn
            if conn is not None and self._suspect:
                if probe(conn):
                    self._suspect = False
                else:
                    log.info("libvirt connection to %s is broken; reconnecting", self.uri)
                    self._conn = None
                    close_quietly(conn)
                    conn = None
            if conn is None:
                conn = self._open()
            return conn

    def _leave_parent_connection(self) -> None:
        if self._pid == os.getpid():
            return
        # The parent's connection was detached at fork; just forget it.
        self._conn = None
        self._suspect = False
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def _open(self) -> libvirt.virConnect:
        conn = open_connection(self.uri, readonly=self.readonly)
        self.keepalive = enable_keepalive(conn)
        try:
            conn.registerCloseCallback(self._on_close, None)
            self.close_callback = True
        except libvirt.libvirtError as exc:
            log.debug("no close callback on %s: %s", self.uri, exc)
            self.close_callback = False
        self._conn = conn
        self._suspect = False
        return conn

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        # Runs in the event loop thread: only mark. A late callback for an older connection
        # costs the current one a probe, nothing more.
        log.warning("libvirt connection to %s closed (reason %s)", self.uri, reason)
        self._suspect = True

    def mark_broken(self) -> None:
        """Make the next call probe the connection and reopen it if it does not answer."""
        self._suspect = True

    def reconnect(self) -> libvirt.virConnect:
        """Throw the current connection away and open a new one."""
        with self._lock:
            self._leave_parent_connection()
            old, self._conn = self._conn, None
            if old is not None:
                close_quietly(old)
            return self._open()

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            self._leave_parent_connection()
            old, self._conn = self._conn, None
            if old is not None:
                close_quietly(old)

    def is_alive(self) -> bool:
        """True if the current connection answers (does not open one)."""
        conn = self._conn
        return conn is not None and self._pid == os.getpid() and probe(conn)

    def call(self, fn: Callable[[libvirt.virConnect], T], *, idempotent: bool = True) -> T:
        """Run fn(connection) with errors classified; retry once after reconnecting if allowed.

        Only pass idempotent=True for reads and for writes that are idempotent by construction:
        after a lost connection nobody knows whether the first attempt took effect.
        """
        conn = self.connection()
        try:
            with translating():
                return fn(conn)
        except ConnectionLost:
            self.mark_broken()
            if not idempotent:
                raise
            log.info("retrying a call on %s after the connection broke", self.uri)
        conn = self.connection()
        with translating():
            return fn(conn)

    def version(self) -> dict[str, str]:
        """libvirt and hypervisor versions, host name and canonical URI."""

        def read(conn: libvirt.virConnect) -> dict[str, str]:
            return {
                "uri": conn.getURI(),
                "hostname": conn.getHostname(),
                "driver": conn.getType(),
                "lib_version": format_version(conn.getLibVersion()),
                "hypervisor_version": format_version(conn.getVersion()),
            }

        return self.call(read)

    def host_info(self) -> HostInfo:
        """Versions, identity, CPU count and memory of the host."""

        def read(conn: libvirt.virConnect) -> HostInfo:
            model, memory_mib, cpus, *_ = conn.getInfo()
            return HostInfo(
                uri=conn.getURI(),
                hostname=conn.getHostname(),
                driver=conn.getType(),
                lib_version=format_version(conn.getLibVersion()),
                hypervisor_version=format_version(conn.getVersion()),
                arch=str(model),
                cpus=int(cpus),
                memory_kib=int(memory_mib) * 1024,
            )

        return self.call(read)

    def capabilities_xml(self) -> str:
        """The host capabilities document."""
        return self.call(lambda conn: conn.getCapabilities())

    def capabilities_domain_types(self, arch: str | None = None) -> frozenset[str]:
        """Domain types ('kvm', 'qemu', 'test') offered for hvm guests of arch (default: host's)."""
        root = etree.fromstring(self.capabilities_xml().encode(), _safe_parser())
        wanted = arch or root.findtext("host/cpu/arch") or ""
        found: set[str] = set()
        for guest in root.iterfind("guest"):
            if guest.findtext("os_type") != "hvm":
                continue
            arch_el = guest.find("arch")
            if arch_el is None or (wanted and arch_el.get("name") != wanted):
                continue
            found.update(d.get("type", "") for d in arch_el.iterfind("domain"))
        found.discard("")
        return frozenset(found)


def _safe_parser() -> etree.XMLParser:
    """Parser for libvirt's own documents: no entities, no network, no huge trees."""
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def get_hypervisor(uri: str, readonly: bool = False) -> Hypervisor:
    """This process's shared Hypervisor for uri (a forked child gets its own)."""
    key = (os.getpid(), uri, readonly)
    with _cache_lock:
        hv = _cache.get(key)
        if hv is None:
            hv = _cache[key] = Hypervisor(uri, readonly)
        return hv


def forget_hypervisors() -> None:
    """Close and drop this process's cached Hypervisors (shutdown, tests)."""
    pid = os.getpid()
    with _cache_lock:
        mine = [key for key in _cache if key[0] == pid]
        hvs = [_cache.pop(key) for key in mine]
    for hv in hvs:
        hv.close()
