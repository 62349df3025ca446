"""Migration through the whole portal between two real libvirt daemons on this machine.

Host a is this test process's own libvirtd (its QEMU driver), host b a second libvirtd with its
own host UUID; both have the demo pool at /var/lib/libvirt/images/vmportal (shared storage) and
migrate to tcp://127.0.0.1. A worker serves each host's queue and a listener follows each host.
The tiny guest is provisioned through the demo template pinned to a; once installed it prints
``VMPORTAL-ALIVE <uptime>`` every 5 s, so a guest that keeps counting was moved, not rebooted.
"""

# ruff: noqa: F811 - the tests take the fixtures imported below as arguments

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client

from provisioning.demo.tinyguest import parse_console
from provisioning.hypervisor import operations
from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, GuestTemplate, Host, Job, JobEvent, ProvisioningRequest
from provisioning.services import placement
from provisioning.services.actions import guest_action
from provisioning.services.migrate import (
    MigrationRefused,
    migration_cancel,
    migration_start,
)
from provisioning.services.provision import Overrides, request_submit
from tests.factories import make_guest
from tests.support.hosts import second_libvirtd  # noqa: F401 - fixture
from tests.support.multihost import (
    MIGRATION_TIMEOUT,
    HostStack,
    Published,
    QemuHosts,
    alive_after,
    badge_of,
    finished,
    host_stack,  # noqa: F401 - fixture
    mark_down,
    new_guest_name,
    provision_on_a,
    published,  # noqa: F401 - fixture
    qemu_hosts,  # noqa: F401 - fixture
    uptimes,
    wait_listening,
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(400)]

Status = ProvisioningRequest.Status


class StateLog:
    """Guest states the portal published on the guest's channel, recorded from a thread."""

    def __init__(self, url: str, guest: Guest) -> None:
        self.states: list[str] = []
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(f"vmportal:guest:{guest.uuid}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None:
                payload: dict[str, Any] = json.loads(message["data"])
                if "state" in payload and "job" not in payload:
                    self.states.append(str(payload["state"]))

    def __enter__(self) -> StateLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def a_and_b_running(qemu_hosts: QemuHosts, host_stack: HostStack) -> Iterator[QemuHosts]:
    """Workers for hv.a and hv.b, and a listener for each host, all connected."""
    for host in (qemu_hosts.a, qemu_hosts.b):
        host_stack.worker(host)
        host_stack.listener(host)
    wait_listening(qemu_hosts.a, qemu_hosts.b)
    yield qemu_hosts


def test_a_running_guest_moves_live_to_b_and_back_offline_once_stopped(
    a_and_b_running: QemuHosts, host_stack: HostStack, published: Published, staff: User
) -> None:
    hosts = a_and_b_running
    guest = provision_on_a(hosts, host_stack, staff)
    uuid = str(guest.uuid)
    before = uptimes(hosts.console(hosts.a, uuid))[-1]

    # --- live, with a bandwidth cap that stretches it over seconds of progress ---
    with StateLog(host_stack.redis.url, guest) as watched:
        job = finished(
            migration_start(guest=guest, by=staff, dest=hosts.b, bandwidth_mib=16),
            MIGRATION_TIMEOUT,
        )
    states = watched.states

    assert job.status == Job.Status.SUCCEEDED, f"{job.error}\n{host_stack.logs()}"
    assert job.data["live"] is True and job.data["bandwidth_mib"] == 16
    progress = list(
        JobEvent.objects.filter(job=job, message__startswith="Migrated").values_list(
            "progress", flat=True
        )
    )
    assert any(p is not None and 0 < p < 100 for p in progress), progress
    guest.refresh_from_db()
    assert (guest.host, guest.state, guest.persistent) == (hosts.b, Guest.State.RUNNING, True)
    on_b = operations.get_info(hosts.hv_b, uuid)
    assert (on_b.state, on_b.persistent) == (GuestState.RUNNING, True)
    assert not operations.get_info(hosts.hv_a, uuid).exists
    # Still the same boot, still counting on b: moved, not restarted.
    alive_after(hosts, hosts.b, guest, before)
    assert "VMPORTAL-READY" not in hosts.console(hosts.b, uuid)
    # The portal never showed the guest as gone while it moved.
    assert Guest.State.UNDEFINED not in states, states

    # --- stopped on b (by b's worker), then offline back to a ---
    off = finished(guest_action(guest=guest, kind=Job.Kind.FORCE_OFF, by=staff))
    assert off.status == Job.Status.SUCCEEDED, off.error
    guest.refresh_from_db()
    assert guest.state == Guest.State.DEFINED

    back = finished(migration_start(guest=guest, by=staff, dest=hosts.a), MIGRATION_TIMEOUT)

    assert back.status == Job.Status.SUCCEEDED, f"{back.error}\n{host_stack.logs()}"
    assert back.data["live"] is False
    guest.refresh_from_db()
    assert (guest.host, guest.state, guest.persistent) == (hosts.a, Guest.State.DEFINED, True)
    on_a = operations.get_info(hosts.hv_a, uuid)
    assert (on_a.state, on_a.persistent) == (GuestState.DEFINED, True)
    assert not operations.get_info(hosts.hv_b, uuid).exists

    # Booted on a again, from the disk a's installer wrote and b's run used.
    started = finished(guest_action(guest=guest, kind=Job.Kind.START, by=staff))
    assert started.status == Job.Status.SUCCEEDED, started.error
    alive_after(hosts, hosts.a, guest, -1.0)
    assert operations.get_info(hosts.hv_a, uuid).state == GuestState.RUNNING
    assert parse_console(hosts.console(hosts.a, uuid)).disk_marker == "installed"
    # Each migration ran on its source host's queue; each action on the guest's host then.
    ran = [(s.name, s.queue) for s in published.sent if s.name != "provisioning.advance_request"]
    assert ran == [
        ("provisioning.run_migration", "hv.a"),
        ("provisioning.run_job", "hv.b"),
        ("provisioning.run_migration", "hv.b"),
        ("provisioning.run_job", "hv.a"),
    ]


def test_a_cancelled_migration_leaves_the_guest_running_on_a(
    qemu_hosts: QemuHosts, host_stack: HostStack, staff: User
) -> None:
    hosts = qemu_hosts
    host_stack.worker(hosts.a)
    host_stack.listener(hosts.a)
    wait_listening(hosts.a)
    guest = provision_on_a(hosts, host_stack, staff)
    uuid = str(guest.uuid)
    row = Guest.objects.values("host", "state", "persistent", "state_reason").get(pk=guest.pk)
    before = uptimes(hosts.console(hosts.a, uuid))[-1]

    # 1 MiB/s: the guest's memory would take minutes.
    job = migration_start(guest=guest, by=staff, dest=hosts.b, bandwidth_mib=1)
    wait_until(
        lambda: JobEvent.objects.filter(job=job, message__startswith="Migrated").exists(),
        timeout=MIGRATION_TIMEOUT,
        what=f"the migration moving data\n{host_stack.logs()}",
    )
    assert operations.get_info(hosts.hv_b, uuid).exists  # b is receiving it
    assert migration_cancel(job=job)
    job = finished(job)

    assert job.status == Job.Status.CANCELLED, f"{job.error}\n{host_stack.logs()}"
    assert "stays on its source host" in job.error
    assert JobEvent.objects.filter(job=job, message__startswith="Cancel requested").exists()
    assert (
        Guest.objects.values("host", "state", "persistent", "state_reason").get(pk=guest.pk) == row
    )
    on_a = operations.get_info(hosts.hv_a, uuid)
    assert (on_a.state, on_a.persistent) == (GuestState.RUNNING, True)
    assert not operations.get_info(hosts.hv_b, uuid).exists
    alive_after(hosts, hosts.a, guest, before)
    assert not migration_cancel(job=job)  # too late: it ended


def test_it_refuses_transient_guests_installs_and_down_hosts_cleanly(
    qemu_hosts: QemuHosts, staff: User
) -> None:
    hosts = qemu_hosts

    def guest(name: str, **fields: Any) -> Guest:
        fields.setdefault("persistent", True)
        return make_guest(owner=staff, host=hosts.a, name=name, **fields)

    def refusal(g: Guest, **options: Any) -> str:
        with pytest.raises(MigrationRefused) as refused:
            migration_start(guest=g, by=staff, dest=hosts.b, **options)
        return str(refused.value)

    def building(g: Guest, status: str, kind: str = ProvisioningRequest.Kind.NEW) -> Guest:
        ProvisioningRequest.objects.create(
            kind=kind,
            owner=staff,
            template=hosts.template,
            template_version=hosts.template.version,
            name=g.name,
            vcpus=1,
            memory_mib=256,
            disk_mib=64,
            host=hosts.a,
            guest=g,
            status=status,
        )
        return g

    transient = guest("transient", persistent=False)
    # A new guest's row stays undefined and not persistent until its install is done.
    installing = building(
        guest("installing", state=Guest.State.UNDEFINED, persistent=False), Status.INSTALLING
    )
    pending = building(
        guest("pending", state=Guest.State.UNDEFINED, persistent=False), Status.PENDING
    )
    rebuilding = building(guest("rebuilding"), Status.WAITING, ProvisioningRequest.Kind.REBUILD)
    gone = guest("gone", state=Guest.State.UNDEFINED)
    fine = guest("fine")

    assert "transient" in refusal(transient)
    assert refusal(installing) == "installing is being installed; migrate it once it runs"
    assert "being installed" in refusal(pending)
    assert "being installed" in refusal(rebuilding)
    assert "gone is undefined" in refusal(gone)
    assert "bandwidth cap must be positive" in refusal(fine, bandwidth_mib=0)
    mark_down(hosts.b)
    assert refusal(fine) == "the destination host b is down or disabled"
    mark_down(hosts.a)
    assert refusal(fine) == "the source host a is down or disabled"
    assert not Job.objects.filter(kind=Job.Kind.MIGRATE).exists()


def placed(template: GuestTemplate) -> Host:
    with transaction.atomic():
        return placement.place(template=template, vcpus=1, memory_mib=256, disk_mib=64)


def test_a_silent_host_gets_no_guests_and_shows_unreachable_until_it_is_heard_again(
    qemu_hosts: QemuHosts, host_stack: HostStack, staff: User, staff_client: Client
) -> None:
    hosts = qemu_hosts
    # Placeable on either host (no pool, no pin); b has the most room.
    anywhere = GuestTemplate.objects.get(pk=hosts.template.pk)
    anywhere.pk, anywhere.name, anywhere.host, anywhere.pool = None, "Anywhere", None, None
    anywhere.save()
    Host.objects.filter(pk=hosts.b.pk).update(capacity_memory_mib=2 * hosts.a.capacity_memory_mib)
    on_b = make_guest(
        owner=staff, host=hosts.b, name="on-b", state=Guest.State.RUNNING, persistent=True
    )
    listener = host_stack.listener(hosts.b)
    wait_listening(hosts.b)
    assert placed(anywhere) == hosts.b
    assert badge_of(staff_client.get("/").content.decode(), on_b) == "running"

    # b's listener goes away; its last word grows old (set here rather than waiting 30 s).
    host_stack.stop(listener)
    mark_down(hosts.b)
    request = request_submit(
        owner=staff, template=anywhere, overrides=Overrides(name=new_guest_name())
    )
    board = staff_client.get("/").content.decode()
    page = staff_client.get(f"/guests/{on_b.uuid}/").content.decode()

    assert request.host == hosts.a
    assert placed(anywhere) == hosts.a
    assert badge_of(board, on_b) == "unreachable"
    assert "Host b is unreachable" in page

    host_stack.listener(hosts.b)
    wait_listening(hosts.b)

    assert not placement.host_is_down(Host.objects.get(pk=hosts.b.pk))
    assert placed(anywhere) == hosts.b
    assert badge_of(staff_client.get("/").content.decode(), on_b) == "running"
    assert "is unreachable" not in staff_client.get(f"/guests/{on_b.uuid}/").content.decode()
