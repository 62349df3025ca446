"""What a libvirt lifecycle event (or a reconcile pass) changes in the portal."""

from __future__ import annotations

import dataclasses
import logging

from django.conf import settings
from django.db.models import Exists, OuterRef, Subquery

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import Guest, Host, Job, ProvisioningRequest
from provisioning.services import actions, addresses, audit, provision, snapshots
from provisioning.services.guests import NOT_SEEN, guest_agrees, guest_sync_state

log = logging.getLogger(__name__)
# The reason a vanished autodestroy guest is recorded with (Guest.state_reason, 32 at most).
AUTODESTROYED = "autodestroyed"


def _explained(guest: Guest, info: DomainInfo) -> DomainInfo:
    """What a guest libvirt does not know is: a transient guest saved to its file, or an
    autodestroy guest libvirt destroyed when the connection that started it (a worker's)
    closed; nothing else when neither."""
    if info.exists:
        return info
    saved = actions.saved_transient(guest)
    if saved is not None:
        return saved
    if guest.autodestroy:
        return dataclasses.replace(info, reason=AUTODESTROYED)
    return info


def domain_changed(*, host: Host, uuid: str, info: DomainInfo | None = None) -> None:
    """Apply libvirt's view of one domain: the guest row, a waiting install, a shutdown job.

    libvirt is read after the checks below, so a state read mid-way through a job (a restore
    runs paused while it loads; a migrating guest is paused and undefined as it leaves) never
    lands on the row after the job recorded how it left the guest.
    """
    requests = ProvisioningRequest.objects.filter(guest=OuterRef("pk"))
    guest = (
        Guest.objects.filter(host=host, uuid=uuid)
        .annotate(
            waiting=Subquery(
                requests.filter(status=ProvisioningRequest.Status.WAITING).values("pk")[:1]
            ),
            building=Exists(requests.filter(status__in=ProvisioningRequest.ACTIVE)),
            # A running job (a migration too) records the state it leaves when it ends. A
            # shutdown job is different: it waits for exactly this event to end.
            working=Exists(
                Job.objects.filter(guest=OuterRef("pk"), status=Job.Status.RUNNING).exclude(
                    kind=Job.Kind.SHUTDOWN
                )
            ),
        )
        .first()
    )
    if guest is None:
        return
    if guest.waiting is not None:
        # The installer's run is not the guest's state yet; the request decides what it means.
        if info is None:
            info = operations.get_info(get_hypervisor(host.uri), uuid)
        if not info.active:
            provision.request_domain_stopped(guest.waiting, info=info)
        return
    if guest.building or guest.working:
        return  # the steps or the job record the state themselves when they finish
    if info is None:
        info = operations.get_info(get_hypervisor(host.uri), uuid)
    info = _explained(guest, info)
    was_running = guest.state == Guest.State.RUNNING
    if not guest_agrees(guest, info):
        before = guest.state
        # A job that ran since the row was read recorded a later state than this one.
        if not guest_sync_state(host=host, info=info, guest=guest, seen=guest.state_changed):
            return
        _record_seen(guest, before, info)
    if info.state == GuestState.RUNNING and not was_running:
        addresses.watch_after_start(guest, host)  # started behind the portal's back
    if not info.active:
        actions.job_domain_stopped(guest, info)


def _record_seen(guest: Guest, before: str, info: DomainInfo) -> None:
    """Audit a change libvirt reported that no job of the portal made (inside, or virsh)."""
    if before == info.state.value:
        return
    audit.record(
        "guest.state",
        guest,
        changes={"state": (before, info.state.value)},
        detail=info.reason or "",
    )


def reconcile_host(host: Host) -> dict[str, int]:
    """One pass over a host: every domain in one call, then rows, requests and jobs made true."""
    with audit.acting(audit.Channel.RECONCILE):
        return _reconcile_host(host)


def _reconcile_host(host: Host) -> dict[str, int]:
    hv = get_hypervisor(host.uri)
    # The rows' last state change as it was before libvirt is read (see guest_sync_state).
    seen = dict(Guest.objects.filter(host=host).values_list("uuid", "state_changed"))
    domains = {d.uuid: d for d in operations.list_domains(hv)}
    migrating = Job.objects.filter(kind=Job.Kind.MIGRATE, status__in=Job.ACTIVE)
    # A persistent guest found here that the portal places elsewhere moved here (a migration
    # whose worker died after libvirt finished): the row follows the guest.
    arrived = (
        Guest.objects.filter(uuid__in=[u for u, d in domains.items() if d.persistent])
        .exclude(host=host)
        .exclude(pk__in=migrating.values("guest_id"))
    )
    for guest in arrived:
        log.warning("guest %s was found on %s; moving its row there", guest, host)
        Guest.objects.filter(pk=guest.pk, host_id=guest.host_id).update(host=host)
    guests = {str(g.uuid): g for g in Guest.objects.filter(host=host)}
    busy = set(
        ProvisioningRequest.objects.filter(
            host=host, status__in=ProvisioningRequest.ACTIVE
        ).values_list("guest__uuid", flat=True)
    )
    # A guest on the move is recorded by its migration when that ends (see domain_changed).
    busy |= set(migrating.filter(status=Job.Status.RUNNING).values_list("guest__uuid", flat=True))
    known = {
        str(u) for u in Guest.objects.filter(uuid__in=list(domains)).values_list("uuid", flat=True)
    }
    unmanaged = [
        {
            "uuid": d.uuid,
            "name": d.name,
            "state": d.state.value,
            "vcpus": d.vcpus if d.active else 0,
            "memory_mib": d.memory_kib // 1024 if d.active else 0,
        }
        for d in domains.values()
        if d.uuid not in known
    ]
    if unmanaged != host.unmanaged_domains:
        Host.objects.filter(pk=host.pk).update(unmanaged_domains=unmanaged)
    synced = 0
    for uuid, guest in guests.items():
        if guest.uuid in busy:
            continue
        info = _explained(guest, domains.get(uuid, DomainInfo.undefined(uuid)))
        if guest.state == Guest.State.UNDEFINED and not info.exists:
            continue
        before = guest.state
        if guest_sync_state(host=host, info=info, seen=seen.get(guest.uuid, NOT_SEEN)):
            synced += 1
            if before != info.state.value:
                _record_seen(guest, before, info)
    stale_after = settings.STALE_STEP_SECONDS
    provision.reconcile_requests(host, domains, stale_after=stale_after)
    actions.reconcile_jobs(hv, guests, domains, stale_after=stale_after)
    addresses.reconcile_addresses(host)
    snapshots.reconcile_host(hv, host, guests, domains)
    return {"domains": len(domains), "guests": len(guests), "synced": synced}
