"""Where a running guest is on the network, and whether its guest agent is there.

libvirt knows a guest's addresses from its network's DHCP leases, from the guest agent, or from
the host's ARP table, but says nothing when a lease appears. So after every start the guest's
host looks again, often at first and then less, for a bounded time until an address shows (a
guest with no NIC gets one look at most: it will never have an address); agent events and the
periodic reconcile look too. All of it runs on the guest's host (a task or
the listener), never in a web request: pages read the row, and live pages hear of a change
through the guest's news.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from django.utils import timezone

from provisioning import queue
from provisioning.channels import GUESTS, guest_channel, owner_channel
from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.hypervisor.types import NetworkView
from provisioning.models import Guest, Host
from provisioning.services import transitions

log = logging.getLogger(__name__)

# Looks after a start: every second for the first 5 minutes (a user waits for the address to
# SSH in, and a look costs the host four cheap calls; measured: looks every 2 s left the portal
# 2 s behind virt-install, which polls the lease itself), then every 15 s until 15 minutes (a
# slow first boot under emulation), then no more: reconcile and agent events look later on.
LOOK_EVERY = 1.0
LOOK_EVERY_LATER = 15.0
LOOK_OFTEN_FOR = timedelta(minutes=5)
LOOK_FOR = timedelta(minutes=15)
# Reconcile looks again at running guests with no address, or none checked this long.
RECHECK_AFTER = timedelta(minutes=5)
RECHECK_PER_PASS = 20


def guest_refresh_network(guest: Guest) -> bool:
    """Read the guest's addresses and agent state from libvirt; True if the row changed."""
    return _refresh(guest)[1]


def _refresh(guest: Guest) -> tuple[NetworkView | None, bool]:
    """What libvirt says of the guest's network (None: it could not say), and whether its row
    changed."""
    hv = get_hypervisor(guest.host.uri)
    try:
        view = operations.network_view(hv, str(guest.uuid))
    except HypervisorError as exc:
        log.info("cannot read the addresses of %s: %s", guest, exc)
        return None, False
    addresses = [dataclasses.asdict(a) for a in view.addresses]
    return view, _record(guest, addresses=addresses, agent_connected=view.agent_connected)


def guest_forget_network(guest: Guest) -> bool:
    """A stopped guest has no addresses and no agent; True if the row changed."""
    return _record(guest, addresses=[], agent_connected=False)


# A look that finds nothing new records when it looked at most this often (reconcile reads it).
NOTE_LOOKS_EVERY = timedelta(seconds=30)


def _record(guest: Guest, *, addresses: list[dict[str, object]], agent_connected: bool) -> bool:
    now = timezone.now()
    changed = addresses != guest.addresses or agent_connected != guest.agent_connected
    last = guest.addresses_checked
    if not changed and last is not None and now - last < NOTE_LOOKS_EVERY:
        return False
    values: dict[str, object] = {"addresses_checked": now}
    if changed:
        values.update(addresses=addresses, agent_connected=agent_connected)
    Guest.objects.filter(pk=guest.pk).update(**values)
    guest.addresses, guest.agent_connected, guest.addresses_checked = (
        addresses,
        agent_connected,
        now,
    )
    if changed:
        news = transitions.News()
        payload = {
            "guest": str(guest.uuid),
            "addresses": [a["ip"] for a in addresses],
            "agent": agent_connected,
        }
        for channel in (guest_channel(guest.uuid), GUESTS, owner_channel(guest.owner_id)):
            news.add(channel, payload)
        news.send_on_commit()
    return changed


def watch_after_start(guest: Guest, host: Host) -> None:
    """Look for the guest's addresses from now on (see `look_after_start`)."""
    queue.send_on_commit(
        queue.LOOK_FOR_ADDRESSES,
        guest.pk,
        timezone.now().isoformat(),
        0,
        queue=host.queue,
        countdown=LOOK_EVERY,
    )


def look_after_start(guest_id: int, since: str, attempt: int) -> None:
    """One look after a start; queued again until an IPv4 address shows or time is up (or the
    guest turns out to have no NIC).

    `attempt` counts the looks (it shows in the worker's log)."""
    guest = Guest.objects.select_related("host").filter(pk=guest_id).first()
    if guest is None or guest.state != Guest.State.RUNNING:
        return  # gone or stopped: its next start watches again
    view, _changed = _refresh(guest)
    if any(a.get("family") == "ipv4" for a in guest.addresses):
        return
    if view is not None and not view.nics:
        return  # no NIC, no address to wait for; agent events still say when its agent comes
    waited = timezone.now() - datetime.fromisoformat(since)
    if waited > LOOK_FOR:
        log.info("no address for %s after %s", guest, LOOK_FOR)
        return
    delay = LOOK_EVERY if waited < LOOK_OFTEN_FOR else LOOK_EVERY_LATER
    queue.send(
        queue.LOOK_FOR_ADDRESSES,
        guest.pk,
        since,
        attempt + 1,
        queue=guest.host.queue,
        countdown=delay,
    )


def agent_changed(*, host: Host, uuid: str, connected: bool) -> None:
    """The guest agent came or went (an agent event): record it, and look at the addresses."""
    guest = Guest.objects.select_related("host").filter(host=host, uuid=uuid).first()
    if guest is None:
        return
    if not connected:
        _record(guest, addresses=guest.addresses, agent_connected=False)
        return
    guest_refresh_network(guest)


def reconcile_addresses(host: Host) -> int:
    """Look again at running guests with no address or an old look; how many changed."""
    now = timezone.now()
    due = (
        Guest.objects.filter(host=host, state=Guest.State.RUNNING)
        .select_related("host")
        .order_by("addresses_checked")
    )
    stale = [
        g
        for g in due[: RECHECK_PER_PASS * 5]
        if g.addresses_checked is None
        or (not g.addresses and now - g.addresses_checked > timedelta(seconds=30))
        or now - g.addresses_checked > RECHECK_AFTER
    ][:RECHECK_PER_PASS]
    changed = sum(guest_refresh_network(g) for g in stale)
    stopped = Guest.objects.filter(host=host).exclude(
        state__in=(Guest.State.RUNNING, Guest.State.PAUSED)
    )
    for guest in stopped.exclude(addresses=[]).select_related("host")[:RECHECK_PER_PASS]:
        changed += guest_forget_network(guest)
    return changed
