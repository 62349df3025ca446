"""Migration of a guest between hosts, as a job on the source host's queue."""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction

from provisioning import queue
from provisioning.hypervisor import migration, operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.hypervisor.types import DomainInfo
from provisioning.models import Guest, Host, Job, ProvisioningRequest, StoragePool
from provisioning.services import audit, placement, transitions
from provisioning.services.guests import guest_sync_state

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5


class MigrationRefused(ValueError):
    """The migration cannot start; the message says why."""


def _shared_storage(guest: Guest, dest: Host) -> bool:
    """True when every pool of the guest's host has a twin (same name and path) on dest."""
    pools = StoragePool.objects.filter(host=guest.host_id)
    return all(
        StoragePool.objects.filter(host=dest, name=p.name, path=p.path).exists() for p in pools
    )


def migration_start(
    *, guest: Guest, by: User | None, dest: Host | None = None, bandwidth_mib: int | None = None
) -> Job:
    """Check the migration can run, open its job and queue it on the source host.

    bandwidth_mib caps the transfer (MiB/s), e.g. to spare a busy network; None: no cap.
    """
    try:
        job = _migration_start(guest=guest, by=by, dest=dest, bandwidth_mib=bandwidth_mib)
    except (MigrationRefused, transitions.GuestBusy) as exc:
        audit.refused("guest.migrate", guest, str(exc), by=by)
        raise
    return job


def _migration_start(
    *, guest: Guest, by: User | None, dest: Host | None, bandwidth_mib: int | None
) -> Job:
    if bandwidth_mib is not None and bandwidth_mib <= 0:
        raise MigrationRefused(f"the bandwidth cap must be positive, not {bandwidth_mib} MiB/s")
    # First: a guest being installed is not persistent yet, and "transient" would mislead.
    if ProvisioningRequest.objects.filter(
        guest=guest, status__in=ProvisioningRequest.ACTIVE
    ).exists():
        raise MigrationRefused(f"{guest.name} is being installed; migrate it once it runs")
    if guest.autodestroy:
        raise MigrationRefused(
            f"{guest.name} is autodestroyed with the connection that started it; libvirt "
            "migrates no such guest"
        )
    held = guest.snapshots.count()
    if held:
        raise MigrationRefused(
            f"{guest.name} has {held} internal snapshot{'s' if held != 1 else ''}, which libvirt "
            "cannot move with it; delete them first"
        )
    if not guest.persistent:
        raise MigrationRefused(
            f"{guest.name} is transient (it would be destroyed with its connection); "
            "only persistent guests migrate"
        )
    if guest.state not in (Guest.State.RUNNING, Guest.State.DEFINED):
        raise MigrationRefused(
            f"{guest.name} is {guest.get_state_display().lower()}; "
            "running guests migrate live, stopped ones offline"
        )
    # Hosts read afresh (the callers' objects may be old): health is judged as it is now.
    source = Host.objects.get(pk=guest.host_id)
    if placement.host_is_down(source) or not source.enabled:
        raise MigrationRefused(f"the source host {source} is down or disabled")
    with transaction.atomic():
        if dest is None:
            dest = _choose_destination(guest)
        else:
            # Locked as placement locks it, so two moves at once cannot both take its last room.
            dest = Host.objects.select_for_update(no_key=True).get(pk=dest.pk)
        if dest.pk == source.pk:
            raise MigrationRefused(f"{guest.name} is on {dest} already")
        if not dest.enabled or placement.host_is_down(dest):
            raise MigrationRefused(f"the destination host {dest} is down or disabled")
        if not placement.host_free(dest).fits(
            guest.vcpus, guest.memory_mib, guest.disk_mib + guest.data_disk_mib
        ):
            raise MigrationRefused(f"the destination host {dest} has no room for {guest.name}")
        if not _shared_storage(guest, dest):
            raise MigrationRefused(
                f"{dest} does not share {guest.name}'s storage pools (same name and path); "
                "migration with storage copy is not supported"
            )
        live = guest.state == Guest.State.RUNNING
        data: dict[str, Any] = {"dest": dest.pk, "source": source.pk, "live": live}
        if bandwidth_mib is not None:
            data["bandwidth_mib"] = bandwidth_mib
        job = transitions.job_open(
            kind=Job.Kind.MIGRATE,
            guest=guest,
            created_by=by,
            data=data,
            note=f"{'Live' if live else 'Offline'} migration from {source} to {dest} requested",
        )
        audit.record(
            "guest.migrate",
            guest,
            by=by,
            changes={"host": (source.name, dest.name)},
            detail=f"{'live' if live else 'offline'}, job #{job.pk}",
        )
        queue.send_on_commit(queue.RUN_MIGRATION, job.pk, queue=source.queue)
    return job


def _choose_destination(guest: Guest) -> Host:
    others = [
        h
        for h in Host.objects.exclude(pk=guest.host_id)
        .select_for_update(no_key=True)
        .order_by("pk")
        if h.enabled and not placement.host_is_down(h)
    ]
    room = [
        (placement.host_free(h), h)
        for h in others
        if placement.host_free(h).fits(
            guest.vcpus, guest.memory_mib, guest.disk_mib + guest.data_disk_mib
        )
    ]
    if not room:
        raise MigrationRefused(f"no other enabled, healthy host has room for {guest.name}")
    return max(room, key=lambda pair: pair[0].memory_mib)[1]


def migration_cancel(*, job: Job) -> bool:
    """Ask a running migration to stop (the worker aborts the libvirt job); False if too late."""
    data = {**job.data, "cancel": True}
    asked = bool(
        Job.objects.filter(pk=job.pk, kind=Job.Kind.MIGRATE, status__in=Job.ACTIVE).update(
            data=data
        )
    )
    if asked:
        audit.record("job.cancel", job, detail=f"migration of {job.guest}")
    else:
        audit.refused("job.cancel", job, "the migration has already ended")
    return asked


def _cancel_requested(job_id: int) -> bool:
    data = Job.objects.values_list("data", flat=True).get(pk=job_id)
    return bool(data.get("cancel"))


def run_migration(job_id: int) -> None:
    """Migrate with live progress, aborting on cancel; on success the guest moves host."""
    job = Job.objects.select_related("guest__host").get(pk=job_id)
    if job.data.get("cancel") and job.status == Job.Status.QUEUED:
        transitions.job_move(job_id, expected=Job.Status.QUEUED, to=Job.Status.CANCELLED)
        return
    try:
        transitions.job_move(job_id, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    except transitions.StaleState:
        return
    guest = job.guest
    assert guest is not None
    source, dest = guest.host, Host.objects.get(pk=job.data["dest"])
    src, dst = get_hypervisor(source.uri), get_hypervisor(dest.uri)
    uuid = str(guest.uuid)
    outcome: dict[str, Any] = {}

    def migrate() -> None:
        try:
            outcome["info"] = migration.migrate(
                src,
                dst,
                uuid,
                live=bool(job.data.get("live")),
                migration_uri=f"tcp://{dest.migration_address}" if dest.migration_address else None,
                unsafe=True,  # shared storage: the same files on both hosts
                bandwidth_mib=job.data.get("bandwidth_mib"),
            )
        except HypervisorError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=migrate, name=f"migrate-{uuid}", daemon=True)
    worker.start()
    last, aborted = -1, False
    while worker.is_alive():
        worker.join(POLL_SECONDS)
        if not worker.is_alive():
            break
        if not aborted and _cancel_requested(job_id):
            aborted = True
            transitions.job_log(job_id, "Cancel requested: aborting the migration")
            try:
                migration.abort_migration(src, uuid)
            except HypervisorError as exc:
                log.warning("abort of %s failed: %s", uuid, exc)
        try:
            progress = migration.migration_progress(src, uuid)
        except HypervisorError:
            continue
        percent = progress.percent if progress is not None else None
        if percent is not None and int(percent) != last:
            last = int(percent)
            transitions.job_log(job_id, f"Migrated {last}%", progress=min(99, last))
    if "error" in outcome:
        guest_sync_state(host=source, info=operations.get_info(src, uuid))
        to = Job.Status.CANCELLED if aborted else Job.Status.FAILED
        message = (
            "cancelled; the guest stays on its source host" if aborted else str(outcome["error"])
        )
        transitions.job_move(job_id, expected=Job.Status.RUNNING, to=to, error=message)
        return
    info: DomainInfo = outcome["info"]
    # The guest now lives on dest: the row follows (conditional, in case anything moved it).
    Guest.objects.filter(pk=guest.pk, host=source).update(host=dest)
    guest_sync_state(host=dest, info=info)
    transitions.job_move(job_id, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)
