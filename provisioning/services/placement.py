"""Placement: which host a new guest goes to, and whether a host is up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Q, Sum
from django.utils import timezone

from provisioning.models import Guest, GuestTemplate, Host, ProvisioningRequest, StoragePool

# A host whose listener has not been heard from for this long is down.
HOST_DOWN_AFTER = timedelta(seconds=30)


class NoRoom(Exception):
    """No enabled, healthy host can take the guest."""


def host_is_down(host: Host) -> bool:
    """True when the host's listener was seen once and has been silent since (never: unknown)."""
    return host.last_seen is not None and host.last_seen < timezone.now() - HOST_DOWN_AFTER


@dataclass(frozen=True)
class Free:
    """What is left on a host."""

    vcpus: int
    memory_mib: int
    disk_mib: int

    def fits(self, vcpus: int, memory_mib: int, disk_mib: int) -> bool:
        return self.vcpus >= vcpus and self.memory_mib >= memory_mib and self.disk_mib >= disk_mib


def host_free(host: Host) -> Free:
    """Capacity less what the portal placed there and what reconcile found beside it."""
    # A pending request's guest holds its room from the moment it was placed: its row is still
    # undefined until the install begins, and the next placement must not hand that room out.
    building = ProvisioningRequest.objects.filter(status__in=ProvisioningRequest.ACTIVE).values(
        "guest_id"
    )
    used = (
        Guest.objects.filter(host=host)
        .filter(~Q(state=Guest.State.UNDEFINED) | Q(pk__in=building))
        .aggregate(
            vcpus=Sum("vcpus"),
            memory=Sum("memory_mib"),
            disk=Sum("disk_mib"),
            data=Sum("data_disk_mib"),
        )
    )
    outside = host.unmanaged_domains or []
    outside_memory = sum(int(d.get("memory_mib", 0)) for d in outside)
    outside_vcpus = sum(int(d.get("vcpus", 0)) for d in outside)
    return Free(
        vcpus=host.capacity_vcpus - int(used["vcpus"] or 0) - outside_vcpus,
        memory_mib=host.capacity_memory_mib - int(used["memory"] or 0) - outside_memory,
        disk_mib=host.capacity_disk_gib * 1024 - int(used["disk"] or 0) - int(used["data"] or 0),
    )


def place(*, template: GuestTemplate, vcpus: int, memory_mib: int, disk_mib: int) -> Host:
    """The enabled, healthy host with the most free memory that fits (call inside a transaction).

    The candidate hosts' rows are locked, so two requests placed at once cannot both take the
    last room on a host (FOR NO KEY UPDATE: the commit-time foreign-key checks of guests and
    requests naming the host must not wait on it, or concurrent placements deadlock).
    """
    if template.host_id is not None:
        candidates = Host.objects.filter(pk=template.host_id)
    elif template.pool_id is not None:
        candidates = Host.objects.filter(pools__pk=template.pool_id)
    else:
        # A subquery, not a join with DISTINCT: PostgreSQL refuses FOR UPDATE with DISTINCT.
        with_disks = StoragePool.objects.filter(for_guest_disks=True).values("host_id")
        candidates = Host.objects.filter(pk__in=with_disks)
    hosts = list(candidates.select_for_update(no_key=True).order_by("pk"))
    if not hosts:
        raise NoRoom("no host with a storage pool for guest disks is registered")
    usable = [h for h in hosts if h.enabled and not host_is_down(h)]
    if not usable:
        names = ", ".join(h.name for h in hosts)
        raise NoRoom(f"every host that could take it is disabled or down ({names})")
    room = [(host_free(h), h) for h in usable]
    fitting = [(free, h) for free, h in room if free.fits(vcpus, memory_mib, disk_mib)]
    if not fitting:
        raise NoRoom(
            f"no host has room for {vcpus} vCPUs, {memory_mib} MiB of memory and "
            f"{disk_mib} MiB of disk"
        )
    return max(fitting, key=lambda pair: (pair[0].memory_mib, -pair[1].pk))[1]
