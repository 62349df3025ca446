"""libvirtd restarts under live connections: callers and the listener recover by themselves.

The daemon restarted is this test process's own (tests/support/libvirt.py); its QEMU guests
and every other process's daemon go on untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest

from provisioning.hypervisor import (
    EventListener,
    Hypervisor,
    define,
    forget_hypervisors,
    get_hypervisor,
    undefine,
)
from provisioning.hypervisor.connection import probe
from tests.support.domains import domain_xml, new_uuid
from tests.support.events import Inbox
from tests.support.libvirt import (
    QEMU_URI,
    TEST_URI,
    libvirtd_pid,
    start_libvirtd,
    stop_libvirtd,
)
from tests.support.stack import wait_until

pytestmark = pytest.mark.faults

RESTART_TIMEOUT = 30.0


def libvirtd_answers() -> bool:
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError:
        return False
    try:
        return probe(conn)
    finally:
        conn.close()


def restart_libvirtd() -> None:
    """Stop this process's libvirtd, see it gone, start it again and wait until it answers."""
    pid = libvirtd_pid()
    assert pid is not None, "this test process's libvirtd is not running"
    stop_libvirtd()

    wait_until(lambda: libvirtd_pid() is None, timeout=RESTART_TIMEOUT, what="libvirtd to exit")
    start_libvirtd()
    wait_until(libvirtd_answers, timeout=RESTART_TIMEOUT, what="libvirtd to answer")
    assert libvirtd_pid() != pid


@dataclass
class Restart:
    """Observers set up before one libvirtd restart, and what they saw of it."""

    cached: Hypervisor
    cached_conn_before: libvirt.virConnect
    no_callback: Hypervisor
    listener: EventListener
    inbox: Inbox


@pytest.fixture(scope="module")
def restart() -> Iterator[Restart]:
    """Restart libvirtd once under a cached connection, a bare one and a listener."""
    inbox = Inbox()
    listener = EventListener(
        TEST_URI, inbox, on_state=inbox.states.put, min_backoff=0.2, max_backoff=1.0
    )
    no_callback = Hypervisor(QEMU_URI)
    try:
        cached = get_hypervisor(QEMU_URI)
        cached.version()
        # Without the close callback only a failing call can reveal the broken connection.
        no_callback.connection().unregisterCloseCallback()
        listener.start()
        assert listener.wait_connected(10)
        inbox.expect_state(True)

        before = cached.connection()
        restart_libvirtd()

        yield Restart(cached, before, no_callback, listener, inbox)
    finally:
        listener.stop()
        no_callback.close()
        forget_hypervisors()
        if libvirtd_pid() is None:  # leave libvirtd running whatever happened
            start_libvirtd()
        wait_until(libvirtd_answers, timeout=RESTART_TIMEOUT, what="libvirtd to answer")


def test_the_cached_hypervisor_reconnects_on_its_next_call(
    restart: Restart, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="provisioning.hypervisor"):
        version = restart.cached.version()

    assert version["uri"] == QEMU_URI
    assert restart.cached.connection() is not restart.cached_conn_before
    assert get_hypervisor(QEMU_URI) is restart.cached
    # The close callback flagged it, so no call had to fail first.
    assert "retrying a call" not in caplog.text


def test_a_read_retries_once_on_a_connection_that_died_silently(
    restart: Restart, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="provisioning.hypervisor"):
        version = restart.no_callback.version()

    assert version["uri"] == QEMU_URI
    assert "retrying a call" in caplog.text


def test_the_listener_reconnects_and_delivers_events_again(restart: Restart) -> None:
    restart.inbox.expect_state(False)
    restart.inbox.expect_state(True, timeout=RESTART_TIMEOUT)
    uuid = new_uuid()
    with Hypervisor(TEST_URI) as hv:
        define(hv, domain_xml(uuid=uuid))
        try:
            event = restart.inbox.expect(uuid, "defined")
        finally:
            undefine(hv, uuid)

    assert event.detail == "added"
    assert restart.listener.connects >= 2
    assert restart.listener.connected
