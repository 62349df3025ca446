"""`run_listener` keeps guest rows true to libvirt, on this process's test driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from provisioning.hypervisor import domxml, operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Guest, Host
from tests.factories import make_guest
from tests.support.libvirt import TEST_POOL, TEST_URI
from tests.support.stack import wait_until
from vmportal import heartbeat


@pytest.fixture
def domain() -> Iterator[str]:
    """A persistent, running domain on this process's test driver."""
    hv = get_hypervisor(TEST_URI)
    spec = domxml.GuestSpec(
        name=f"listener-{uuid.uuid4().hex[:8]}",
        uuid=str(uuid.uuid4()),
        memory_mib=128,
        vcpus=1,
        method="import",
        disks=(domxml.DiskSpec(domxml.VolumeRef(TEST_POOL, "none.img"), format="raw"),),
    )
    operations.define(hv, domxml.final_xml(spec))
    operations.start(hv, spec.uuid)
    yield spec.uuid
    operations.destroy(hv, spec.uuid)
    operations.undefine(hv, spec.uuid)


def guest_state(guest: Guest) -> tuple[str, str]:
    guest.refresh_from_db()
    return guest.state, guest.state_reason


def test_lifecycle_events_update_the_guest_row(
    stack, make_user, domain: str, test_host: Host
) -> None:
    # Not persistent yet: that the row says so at the end is the listener's doing.
    guest = make_guest(
        owner=make_user("erin"),
        host=test_host,
        name="g",
        uuid=domain,
        state=Guest.State.RUNNING,
        persistent=False,
    )
    stack.start("listener")
    wait_until(
        lambda: any(i.get("connected") for i in heartbeat.alive("listener").values()),
        timeout=30,
        what="the listener to connect",
    )
    hv = get_hypervisor(TEST_URI)

    operations.suspend(hv, domain)
    wait_until(lambda: guest_state(guest)[0] == "paused", timeout=10, what="paused in the DB")
    assert guest_state(guest) == ("paused", "user")

    operations.resume(hv, domain)
    wait_until(lambda: guest_state(guest)[0] == "running", timeout=10, what="running again")

    operations.destroy(hv, domain)
    wait_until(lambda: guest_state(guest)[0] == "defined", timeout=10, what="stopped in the DB")
    assert guest_state(guest) == ("defined", "destroyed")
    guest.refresh_from_db()
    assert guest.persistent is True
