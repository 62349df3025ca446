"""The event listener delivers lifecycle events from the test driver."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from provisioning.hypervisor import (
    EventListener,
    Hypervisor,
    LifecycleEvent,
    define,
    destroy,
    resume,
    shutdown,
    start,
    suspend,
    undefine,
)
from tests.support.domains import UNREACHABLE_TEST_URI
from tests.support.events import DEADLINE, Inbox
from tests.support.libvirt import TEST_URI
from tests.support.stack import wait_until


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def listener(inbox: Inbox) -> Iterator[EventListener]:
    running = EventListener(TEST_URI, inbox, on_state=inbox.states.put)
    running.start()
    assert running.wait_connected(DEADLINE)
    yield running
    running.stop()
    assert not running.is_alive()


def test_it_reports_being_connected(listener: EventListener, inbox: Inbox) -> None:
    inbox.expect_state(True)

    assert listener.connected
    assert listener.connects == 1


def test_it_delivers_lifecycle_events_with_uuid_and_detail(
    listener: EventListener, inbox: Inbox, test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()
    define(test_hv, xml)
    start(test_hv, uuid)
    suspend(test_hv, uuid)
    resume(test_hv, uuid)
    destroy(test_hv, uuid)
    undefine(test_hv, uuid)

    defined = inbox.expect(uuid, "defined", "added")
    started = inbox.expect(uuid, "started", "booted")
    inbox.expect(uuid, "suspended", "paused")
    inbox.expect(uuid, "resumed", "unpaused")
    stopped = inbox.expect(uuid, "stopped", "destroyed")
    inbox.expect(uuid, "undefined", "removed")

    assert defined.uri == TEST_URI
    assert started.name == f"vmportal-hvtest-{uuid[:8]}"
    assert defined.timestamp <= started.timestamp <= stopped.timestamp


def test_it_reports_a_shutdown_as_stopped_shutdown(
    listener: EventListener, inbox: Inbox, test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()
    define(test_hv, xml)
    start(test_hv, uuid)

    shutdown(test_hv, uuid)

    assert inbox.expect(uuid, "stopped").detail == "shutdown"


def test_a_failing_callback_does_not_stop_the_listener(
    test_hv: Hypervisor, make_guest, inbox: Inbox
) -> None:
    calls: list[LifecycleEvent] = []

    def explode(event: LifecycleEvent) -> None:
        calls.append(event)
        inbox(event)
        raise RuntimeError("callback bug")

    with EventListener(TEST_URI, explode) as listener:
        assert listener.wait_connected(DEADLINE)
        uuid, xml = make_guest()
        define(test_hv, xml)
        inbox.expect(uuid, "defined")
        start(test_hv, uuid)
        inbox.expect(uuid, "started")

        assert listener.is_alive()
        assert len([c for c in calls if c.uuid == uuid]) >= 2


def test_a_failing_state_callback_does_not_stop_the_listener(test_hv: Hypervisor) -> None:
    reported = threading.Event()

    def bad_state(connected: bool) -> None:
        reported.set()
        raise RuntimeError("state callback bug")

    with EventListener(TEST_URI, lambda event: None, on_state=bad_state) as listener:
        assert reported.wait(DEADLINE)
        assert listener.wait_connected(DEADLINE)
        assert listener.is_alive()


def test_it_keeps_retrying_an_unreachable_uri_and_stops_cleanly(inbox: Inbox) -> None:
    listener = EventListener(
        UNREACHABLE_TEST_URI, inbox, on_state=inbox.states.put, min_backoff=0.05
    )
    listener.start()

    inbox.expect_state(False)
    wait_until(lambda: listener.last_error is not None, timeout=DEADLINE, what="an error")
    listener.stop()

    assert not listener.is_alive()
    assert not listener.connected
    assert listener.connects == 0


def test_it_reconnects_when_its_connection_breaks(
    listener: EventListener, inbox: Inbox, test_hv: Hypervisor, make_guest
) -> None:
    inbox.expect_state(True)
    # What libvirt's close callback reports when the daemon goes away.
    listener._on_close(test_hv.connection(), 0, listener._generation)

    inbox.expect_state(False)
    inbox.expect_state(True)
    uuid, xml = make_guest()
    define(test_hv, xml)

    assert inbox.expect(uuid, "defined").uuid == uuid
    assert listener.connects == 2
