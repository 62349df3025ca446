"""Placement over many hosts: most free memory wins, sick hosts get nothing, nothing overfills.

Database only: no host's URI is dialled. Nothing is queued: the tests replace the queue's send (by
which every service queues) and look at what it would have sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection, connections, transaction
from django.test import Client
from django.utils import timezone

from provisioning import queue as queue_module
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services import placement
from provisioning.services.provision import Overrides, SubmitError, request_submit
from tests import factories
from tests.support.multihost import badge_of, mark_down
from tests.support.stack import wait_until

Status = ProvisioningRequest.Status


@pytest.fixture
def sent(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, tuple[Any, ...], str]]:
    """What the engine queued, as (task name, args, queue), instead of sending it to a broker.

    Transactional: the engine queues on commit, and only real commits run those callbacks.
    """
    queued: list[tuple[str, tuple[Any, ...], str]] = []

    def record(name: str, *args: Any, queue: str, **options: Any) -> bool:
        queued.append((name, args, queue))
        return True

    monkeypatch.setattr(queue_module, "send", record)
    return queued


def make_host(name: str, *, memory_mib: int, vcpus: int = 8, **fields: Any) -> Host:
    """A host with a pool for guest disks (its URI is never dialled by placement)."""
    host = factories.make_host(
        name,
        uri=f"test+unix:///{name}",
        pool=None,
        roomy=False,
        capacity_memory_mib=memory_mib,
        capacity_vcpus=vcpus,
        capacity_disk_gib=100,
        **fields,
    )
    factories.make_pool(host, "disks", path=f"/srv/{name}")
    return host


def make_template(name: str = "Tiny", *, host: Host | None = None) -> GuestTemplate:
    """A kernel-install template placed by the engine (pool: the chosen host's first)."""
    return factories.make_template(name=name, pinned_to=host, memory_mib_default=512)


def guest_on(host: Host, owner: User, name: str, memory_mib: int, **fields: Any) -> Guest:
    """A guest row the portal placed on host (running unless told)."""
    return factories.make_guest(
        owner=owner, host=host, name=name, memory_mib=memory_mib, vcpus=1, **fields
    )


def placed(template: GuestTemplate, memory_mib: int = 512) -> Host:
    with transaction.atomic():
        return placement.place(template=template, vcpus=1, memory_mib=memory_mib, disk_mib=64)


def test_the_host_with_the_most_free_memory_gets_the_guest(make_user, sent) -> None:
    owner = make_user("ann")
    roomy = make_host("roomy", memory_mib=4096)
    big_but_full = make_host("big", memory_mib=8192)
    make_host("small", memory_mib=3800)
    guest_on(big_but_full, owner, "hog", 6144)  # leaves 2048 free of 8192
    template = make_template()

    request = request_submit(owner=owner, template=template, overrides=Overrides(name="web1"))

    assert request.host == roomy
    assert request.guest is not None and request.guest.host == roomy
    assert sent == [("provisioning.advance_request", (request.pk,), "hv.roomy")]
    # The guest now counts on roomy (4096 - 512 = 3584 free): small has more room left now.
    assert placed(template).name == "small"


def test_a_disabled_host_and_a_down_host_get_nothing(make_user, sent) -> None:
    owner = make_user("ann")
    make_host("off", memory_mib=65536, enabled=False)
    down = make_host("down", memory_mib=65536)
    mark_down(down)
    quiet = make_host("quiet", memory_mib=1024, last_seen=timezone.now() - timedelta(seconds=10))
    template = make_template()

    request = request_submit(owner=owner, template=template, overrides=Overrides(name="web1"))

    assert request.host == quiet  # heard from 10 s ago: healthy
    Host.objects.filter(pk=quiet.pk).update(enabled=False)
    with pytest.raises(SubmitError) as refused:
        request_submit(owner=owner, template=template, overrides=Overrides(name="web2"))
    message = refused.value.errors["template"]
    assert "disabled or down" in message
    assert "down" in message and "off" in message and "quiet" in message
    assert Guest.objects.filter(host__name__in=["off", "down"]).count() == 0
    assert len(sent) == 1


def test_a_host_never_heard_from_is_not_down_but_a_silent_one_is() -> None:
    fresh = Host(name="fresh", uri="test:///fresh", last_seen=None)
    recent = Host(name="recent", uri="test:///recent", last_seen=timezone.now())
    silent = Host(
        name="silent", uri="test:///silent", last_seen=timezone.now() - timedelta(seconds=31)
    )

    assert [placement.host_is_down(h) for h in (fresh, recent, silent)] == [False, False, True]


def test_a_pinned_template_goes_to_its_host_and_nowhere_else(make_user, sent) -> None:
    owner = make_user("ann")
    make_host("roomy", memory_mib=65536)
    pinned_to = make_host("tight", memory_mib=768)
    template = make_template(host=pinned_to)

    first = request_submit(owner=owner, template=template, overrides=Overrides(name="web1"))
    with pytest.raises(SubmitError) as refused:
        request_submit(owner=owner, template=template, overrides=Overrides(name="web2"))

    assert first.host == pinned_to
    assert "no host has room for 1 vCPUs, 512 MiB" in refused.value.errors["template"]
    assert not Guest.objects.filter(host__name="roomy").exists()


def test_no_room_is_a_clear_submit_error_and_makes_nothing(make_user, sent) -> None:
    owner = make_user("ann")
    make_host("h1", memory_mib=256)
    make_host("h2", memory_mib=8192, vcpus=0)
    template = make_template()

    with pytest.raises(SubmitError) as refused:
        request_submit(owner=owner, template=template, overrides=Overrides(name="web1"))

    assert refused.value.errors == {
        "template": "Cannot place the guest: no host has room for 1 vCPUs, 512 MiB of memory "
        "and 64 MiB of disk."
    }
    assert Guest.objects.count() == 0
    assert ProvisioningRequest.objects.count() == 0
    assert Job.objects.count() == 0
    assert sent == []


def test_capacity_counts_placed_guests_and_unmanaged_domains(make_user, sent) -> None:
    owner = make_user("ann")
    host = make_host(
        "h",
        memory_mib=2048,
        vcpus=4,
        unmanaged_domains=[
            {"uuid": "u1", "name": "by-hand", "state": "running", "vcpus": 1, "memory_mib": 256},
            # Stopped domains hold nothing (reconcile records them with zeros).
            {"uuid": "u2", "name": "off", "state": "defined", "vcpus": 0, "memory_mib": 0},
        ],
    )
    other = make_host("other", memory_mib=1024)
    template = make_template()
    guest_on(host, owner, "running", 512, disk_mib=1024)
    guest_on(host, owner, "gone", 512, state=Guest.State.UNDEFINED)  # deleted: holds nothing
    building = guest_on(host, owner, "building", 512, state=Guest.State.UNDEFINED)
    ProvisioningRequest.objects.create(
        owner=owner,
        template=template,
        template_version=1,
        name="building",
        vcpus=1,
        memory_mib=512,
        disk_mib=64,
        host=host,
        guest=building,
        status=Status.WAITING,
    )

    free = placement.host_free(host)

    assert (free.vcpus, free.memory_mib, free.disk_mib) == (4 - 3, 2048 - 1280, 100 * 1024 - 1024)
    # 768 MiB left on h, 1024 on other: the guest goes where the room really is.
    assert placed(template).name == "other"
    assert placed(template, memory_mib=1024).name == "other"
    with pytest.raises(placement.NoRoom):
        placed(template, memory_mib=1025)
    assert other.guests.count() == 0


def test_a_submitted_guest_counts_before_its_install_begins(make_user, sent) -> None:
    owner = make_user("ann")
    make_host("tight", memory_mib=768)  # room for one 512 MiB guest
    make_host("spare", memory_mib=600)
    template = make_template()

    first = request_submit(owner=owner, template=template, overrides=Overrides(name="web1"))
    second = request_submit(owner=owner, template=template, overrides=Overrides(name="web2"))

    # Nothing ran yet: the first request is pending and its guest undefined, yet it holds room.
    assert first.status == second.status == Status.PENDING
    assert first.host is not None and second.host is not None
    assert (first.host.name, second.host.name) == ("tight", "spare")


def submit_at_once(
    owner: User, template: GuestTemplate, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[ProvisioningRequest | Exception], bool]:
    """Two submits racing: the first to place holds its transaction until the second is stuck.

    Returns both outcomes in the order they placed, and whether the second was seen blocked
    while the first held the host's row (PostgreSQL: waiting on a row lock; SQLite: the whole
    write transaction waits, so the second must not place while the first holds on).
    """
    real_place = placement.place
    first_placed = threading.Event()
    second_placed = threading.Event()
    order: list[str] = []
    order_lock = threading.Lock()
    seen_blocked: list[bool] = []

    def other_backend_waits_on_a_lock() -> bool:
        with connection.cursor() as cursor:
            # Activity is read once per transaction unless the snapshot is dropped.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            )
            row = cursor.fetchone()
        return bool(row and row[0])

    def slow_place(**kwargs: Any) -> Host:
        try:
            host = real_place(**kwargs)
        except placement.NoRoom:
            with order_lock:
                order.append(threading.current_thread().name)
            second_placed.set()
            raise
        with order_lock:
            order.append(threading.current_thread().name)
            first = len(order) == 1
        if not first:
            second_placed.set()
            return host
        first_placed.set()
        if connection.vendor == "postgresql":
            wait_until(
                lambda: second_placed.is_set() or other_backend_waits_on_a_lock(),
                timeout=20,
                what="the other submit to wait for the host's row lock",
            )
            seen_blocked.append(not second_placed.is_set())
        else:
            # The other submit started before this one placed; give it a second to (wrongly)
            # place too while this transaction is still open.
            seen_blocked.append(not second_placed.wait(1.0))
        return host

    monkeypatch.setattr(placement, "place", slow_place)
    results: dict[str, ProvisioningRequest | Exception] = {}
    go = threading.Barrier(2)

    def run(name: str) -> None:
        try:
            go.wait(10)
            if name == "second":
                # Start once the first holds its placement, so the race is the interesting one.
                first_placed.wait(10)
            results[name] = request_submit(
                owner=owner, template=template, overrides=Overrides(name=f"web-{name}")
            )
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            results[name] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert order == ["first", "second"], order
    return [results["first"], results["second"]], all(seen_blocked) and bool(seen_blocked)


@pytest.mark.parametrize("spare", [True, False], ids=["spare-host", "no-spare-host"])
def test_two_requests_at_once_cannot_overfill_a_host(
    transactional_db: None,
    make_user: Callable[..., User],
    sent: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    spare: bool,
) -> None:
    owner = make_user("ann")
    tight = make_host("tight", memory_mib=768)  # room for exactly one 512 MiB guest
    if spare:
        make_host("spare", memory_mib=600)  # less free memory: only the second goes there
    template = make_template()

    (first, second), second_was_blocked = submit_at_once(owner, template, monkeypatch)

    assert isinstance(first, ProvisioningRequest), first
    assert first.host == tight
    assert second_was_blocked
    assert Guest.objects.filter(host=tight).count() == 1
    assert placement.host_free(tight).memory_mib == 768 - 512
    if spare:
        assert isinstance(second, ProvisioningRequest), second
        assert second.host is not None and second.host.name == "spare"
    else:
        assert isinstance(second, SubmitError), second
        assert "no host has room" in second.errors["template"]
        assert ProvisioningRequest.objects.count() == 1


def test_a_down_hosts_guests_show_host_unreachable(staff_client: Client, make_user) -> None:
    owner = make_user("ann")
    up = make_host("up", memory_mib=4096, last_seen=timezone.now())
    down = make_host("down", memory_mib=4096, last_seen=timezone.now())
    fine = guest_on(up, owner, "fine", 512, persistent=True)
    stuck = guest_on(down, owner, "stuck", 512, persistent=True)
    before = staff_client.get("/").content.decode()

    mark_down(down)
    board = staff_client.get("/").content.decode()
    page = staff_client.get(f"/guests/{stuck.uuid}/").content.decode()
    healthy_page = staff_client.get(f"/guests/{fine.uuid}/").content.decode()

    assert badge_of(before, stuck) == "running"
    assert badge_of(board, stuck) == "unreachable"
    assert "host unreachable" in board
    assert badge_of(board, fine) == "running"
    assert "Host down is unreachable" in page
    assert "is unreachable" not in healthy_page
