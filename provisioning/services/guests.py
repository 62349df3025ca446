"""Guests: keeping each Guest row true to what libvirt reports."""

from __future__ import annotations

from django.utils import timezone

from provisioning.hypervisor.types import DomainInfo
from provisioning.models import Guest, Host
from provisioning.services import transitions


def guest_sync_state(*, host: Host, info: DomainInfo) -> bool:
    """Record libvirt's view of one domain on its Guest row; False when the portal has none."""
    updated = (
        Guest.objects.filter(host=host, uuid=info.uuid)
        .exclude(
            state=info.state.value,
            state_reason=info.reason[:32],
            persistent=info.persistent,
            autostart=info.autostart,
        )
        .update(
            state=info.state.value,
            state_reason=info.reason[:32],
            persistent=info.persistent,
            autostart=info.autostart,
            state_changed=timezone.now(),
        )
    )
    if updated:
        payload = {"guest": info.uuid, "state": info.state.value, "reason": info.reason}
        owner_id = Guest.objects.filter(host=host, uuid=info.uuid).values_list(
            "owner_id", flat=True
        )
        owners = [f"vmportal:owner:{owner}" for owner in owner_id]
        for channel in (f"vmportal:guest:{info.uuid}", "vmportal:guests", *owners):
            transitions.publish(channel, payload)
    return bool(updated) or Guest.objects.filter(host=host, uuid=info.uuid).exists()
