"""Addresses and the guest agent: read on the guest's host after a start, kept on the row, shown.

On libvirt's test driver every NIC of a running guest reports one fixed address from each source
(lease, agent, ARP), so what the portal does with them is seen here without a network; a real
lease, agent and SSH login are in tests/demo/test_debian.py.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from provisioning import selectors
from provisioning.channels import guest_channel
from provisioning.hypervisor import operations
from provisioning.hypervisor.types import NetworkView
from provisioning.models import Guest, GuestTemplate, Host, Job
from provisioning.services import actions, addresses
from provisioning.services.guests import guest_sync_state
from tests.factories import make_network, make_template
from tests.support.engine import (
    hv,
    provision_running,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)

pytestmark = pytest.mark.usefixtures("tidy_libvirt")


@pytest.fixture
def template(test_host: Host) -> GuestTemplate:
    """The test template with a NIC on the test driver's own network."""
    return make_template(
        name="Tiny on a network", host=test_host, network=make_network(test_host, source="default")
    )


@pytest.fixture
def guest(make_user: Any, template: GuestTemplate) -> Guest:
    return provision_running(make_user("kim"), template, "net1").guest


def queued(queue_name: str) -> list[tuple[str, list[Any]]]:
    """The tasks waiting in a Celery queue of this test's Redis: (name, args)."""
    conn = redis.Redis.from_url(settings.REDIS_URL)
    out = []
    for raw in conn.lrange(queue_name, 0, -1):
        message = json.loads(raw)
        out.append((message["headers"]["task"], message["headers"]["argsrepr"]))
    return out


def test_a_started_guest_is_watched_and_its_addresses_land_on_the_row_with_their_source(
    guest: Guest,
) -> None:
    # The start step queued the first look on the guest's host.
    assert any(
        name == "provisioning.look_for_addresses" and f"({guest.pk}," in args
        for name, args in queued(guest.host.queue)
    )
    listener = redis.Redis.from_url(settings.REDIS_URL).pubsub()
    listener.subscribe(guest_channel(guest.uuid))
    listener.get_message(timeout=1)  # the subscription's confirmation
    addresses.look_after_start(guest.pk, timezone.now().isoformat(), 0)
    guest.refresh_from_db()
    (address,) = guest.addresses  # one NIC: the same address from each source, kept once
    assert address["source"] == "lease" and address["family"] == "ipv4"
    assert address["ip"] and address["prefix"] == 24
    assert guest.addresses_checked is not None and guest.agent_connected is False
    news = listener.get_message(timeout=5)
    assert news is not None and json.loads(news["data"])["addresses"] == [address["ip"]]


def looks(guest: Guest) -> list[list[Any]]:
    """The looks for this guest's addresses queued on its host (their argument lists)."""
    return [
        args
        for name, args in queued(guest.host.queue)
        if name == "provisioning.look_for_addresses" and args.startswith(f"({guest.pk},")
    ]


def test_the_look_comes_again_with_backoff_until_an_address_shows_then_stops(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test driver hands every NIC an address at once; a guest still waiting for its DHCP
    # lease is what it cannot show, so the look is told of a NIC and no address.
    monkeypatch.setattr(operations, "network_view", lambda hv, uuid: NetworkView(nics=1))
    Guest.objects.filter(pk=guest.pk).update(addresses=[])
    guest.refresh_from_db()
    before = looks(guest)
    addresses.look_after_start(guest.pk, timezone.now().isoformat(), 3)
    (again,) = [args for args in looks(guest) if args not in before]
    assert again.startswith(f"({guest.pk},") and again.endswith(", 4)")
    long_ago = (timezone.now() - addresses.LOOK_FOR - timedelta(seconds=1)).isoformat()
    addresses.look_after_start(guest.pk, long_ago, 9)
    assert len(looks(guest)) == len(before) + 1  # time is up: no further look
    monkeypatch.undo()  # the real look: the lease is there, and the looks end
    addresses.look_after_start(guest.pk, timezone.now().isoformat(), 5)
    assert len(looks(guest)) == len(before) + 1
    guest.refresh_from_db()
    assert guest.addresses


def test_a_guest_without_a_nic_is_not_watched_and_a_look_at_one_is_its_last(
    make_user: Any, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("kim"), kernel_template, "net2").guest
    assert looks(guest) == []  # the start step queued no look: there is nothing to find
    view = operations.network_view(hv(), str(guest.uuid))
    assert view == NetworkView(addresses=(), agent_connected=False, nics=0)
    # Started some other way (a look is queued after every start): one look, and no more.
    addresses.look_after_start(guest.pk, timezone.now().isoformat(), 0)
    assert looks(guest) == []
    guest.refresh_from_db()
    assert guest.addresses == [] and guest.addresses_checked is not None


def test_a_stopped_guest_forgets_its_addresses(guest: Guest) -> None:
    addresses.guest_refresh_network(guest)
    assert guest.addresses
    info = operations.destroy(hv(), str(guest.uuid))
    guest_sync_state(host=guest.host, info=info, guest=guest)
    guest.refresh_from_db()
    assert guest.addresses == [] and guest.agent_connected is False


def test_reconcile_looks_at_running_guests_never_looked_at(guest: Guest) -> None:
    Guest.objects.filter(pk=guest.pk).update(addresses=[], addresses_checked=None)
    assert addresses.reconcile_addresses(guest.host) == 1
    guest.refresh_from_db()
    assert guest.addresses and guest.addresses_checked is not None
    assert addresses.reconcile_addresses(guest.host) == 0  # just looked: not again yet


def test_agent_events_are_recorded(guest: Guest) -> None:
    Guest.objects.filter(pk=guest.pk).update(agent_connected=True)
    addresses.agent_changed(host=guest.host, uuid=str(guest.uuid), connected=False)
    guest.refresh_from_db()
    assert guest.agent_connected is False
    # Connected: libvirt is asked (the test driver's XML shows no agent, so it says no).
    addresses.agent_changed(host=guest.host, uuid=str(guest.uuid), connected=True)
    guest.refresh_from_db()
    assert guest.agent_connected is False and guest.addresses


def test_shut_down_without_an_agent_uses_acpi_and_says_so(guest: Guest) -> None:
    job = actions.guest_action(guest=guest, kind=Job.Kind.SHUTDOWN, by=guest.owner)
    actions.run_job(job.pk)
    lines = [e.message for e in Job.objects.get(pk=job.pk).events.order_by("id")]
    assert any(line.startswith("Asked the guest to shut down by ACPI") for line in lines), lines


def test_the_pages_show_the_address_its_source_and_the_ssh_line(guest: Guest) -> None:
    addresses.guest_refresh_network(guest)
    ip = guest.addresses[0]["ip"]
    client = Client()
    client.force_login(guest.owner)
    page = client.get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    assert f"{ip}/24" in page and "DHCP lease" in page
    assert f'<code id="ssh-line">ssh {ip}</code>' in page  # not a cloud image: no user known
    assert "guest agent <span" in page and "not connected" in page
    dashboard = client.get(reverse("dashboard")).content.decode()
    assert f"{ip} (lease)" in dashboard


def test_a_cloud_guests_ssh_line_names_its_default_user(guest: Guest) -> None:
    addresses.guest_refresh_network(guest)
    GuestTemplate.objects.filter(pk=guest.template_id).update(
        method=GuestTemplate.Method.CLOUD, cloud_user="debian"
    )
    guest.refresh_from_db()
    assert selectors.ssh_line(guest) == f"ssh debian@{guest.addresses[0]['ip']}"
