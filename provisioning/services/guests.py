"""Guests: keeping each Guest row true to what libvirt reports."""

from __future__ import annotations

from django.db.models import Q
from django.utils import timezone

from provisioning.channels import GUESTS, guest_channel, owner_channel
from provisioning.hypervisor.types import DomainInfo
from provisioning.models import Guest, Host
from provisioning.services import transitions


def _state_of(info: DomainInfo) -> dict[str, object]:
    state: dict[str, object] = {
        "state": info.state.value,
        "state_reason": info.reason[:32],
        "persistent": info.persistent,
        "autostart": info.autostart,
    }
    if not info.active:
        # A guest that does not run has no address and no agent (see services/addresses.py).
        state.update(addresses=[], agent_connected=False)
    return state


def guest_agrees(guest: Guest, info: DomainInfo) -> bool:
    """Whether the row (as loaded) already says what libvirt says."""
    return all(getattr(guest, k) == v for k, v in _state_of(info).items())


# `seen` when the caller did not read the row before libvirt (see guest_sync_state).
NOT_SEEN = object()


def guest_sync_state(
    *, host: Host, info: DomainInfo, guest: Guest | None = None, seen: object = NOT_SEEN
) -> bool:
    """Record libvirt's view of one domain on its Guest row; whether the row now says it
    (False when the portal has no row, or a job's state stands; see below).

    `guest` is the row when the caller has it loaded (it spares a look-up). An observer (an
    event, a reconcile pass) passes as `seen` the row's `state_changed` as it read it before it
    read libvirt. If a job recorded a state since, the job read libvirt after the observer did,
    and its state stands: the observer's write would undo, say, a suspend that just succeeded.
    """
    rows = Guest.objects.filter(host=host, uuid=info.uuid)
    state = _state_of(info)
    changing = rows.exclude(**state)
    if seen is not NOT_SEEN:
        unchanged = Q(state_changed__isnull=True) if seen is None else Q(state_changed=seen)
        changing = changing.filter(unchanged)
    updated = changing.update(**state, state_changed=timezone.now())
    if not updated and seen is not NOT_SEEN and not rows.filter(**state).exists():
        return False  # no row, or a job recorded a later state, which stands
    mine = guest is not None and str(guest.uuid) == info.uuid and guest.host_id == host.pk
    if mine:
        for name, value in state.items():
            setattr(guest, name, value)
    if not updated:
        return mine or rows.exists()
    owners = [guest.owner_id] if mine and guest else list(rows.values_list("owner_id", flat=True))
    news = transitions.News()
    payload = {"guest": info.uuid, "state": info.state.value, "reason": info.reason}
    for channel in (guest_channel(info.uuid), GUESTS, *map(owner_channel, owners)):
        news.add(channel, payload)
    news.send_on_commit()
    return True
