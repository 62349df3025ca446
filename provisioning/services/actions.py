"""Lifecycle actions on existing guests, each run as a job on the guest's host queue."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from provisioning import queue
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.errors import HypervisorError, NotFound, WrongState
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import Guest, Job
from provisioning.services import addresses, jobs, snapshots, stats, transitions
from provisioning.services.guests import guest_sync_state
from provisioning.services.provision.spec import seed_volume

log = logging.getLogger(__name__)
K = Job.Kind
S = Guest.State

# Which actions each state allows: the pages offer exactly these.
ALLOWED: dict[str, frozenset[str]] = {
    S.DEFINED: frozenset({K.START, K.AUTOSTART_ON, K.AUTOSTART_OFF, K.DELETE}),
    S.RUNNING: frozenset(
        {K.SHUTDOWN, K.FORCE_OFF, K.REBOOT, K.SUSPEND, K.SAVE, K.MANAGED_SAVE}
        | {K.AUTOSTART_ON, K.AUTOSTART_OFF, K.MAKE_PERSISTENT, K.DELETE}
    ),
    S.PAUSED: frozenset(
        {K.RESUME, K.FORCE_OFF, K.SAVE, K.MANAGED_SAVE, K.AUTOSTART_ON, K.AUTOSTART_OFF}
        | {K.MAKE_PERSISTENT, K.DELETE}
    ),
    S.SAVED: frozenset({K.RESTORE, K.AUTOSTART_ON, K.AUTOSTART_OFF, K.DELETE}),
    S.UNDEFINED: frozenset(),
}
SHUTDOWN_TIMEOUT = timedelta(seconds=120)


# What libvirt refuses an autodestroy guest (the lifecycle guide: it blocks save-to-file,
# managed save and migration), and why, in the words the refusal uses.
NOT_FOR_AUTODESTROY: dict[str, str] = {
    K.SAVE: "its memory cannot be saved to a file",
    K.MANAGED_SAVE: "it cannot be saved and restored by libvirt",
    K.MAKE_PERSISTENT: "it cannot be given a persistent config",
}


class ActionRefused(ValueError):
    """The action does not fit the guest's state."""


def allowed_actions(guest: Guest) -> list[str]:
    """The actions the guest's current state allows, in a stable order."""
    allowed = ALLOWED.get(guest.state, frozenset())
    if guest.persistent:
        allowed = allowed - {K.MAKE_PERSISTENT}
    else:
        allowed = allowed - {K.AUTOSTART_ON, K.AUTOSTART_OFF, K.MANAGED_SAVE}
    if guest.autodestroy:
        allowed = allowed - set(NOT_FOR_AUTODESTROY)
    allowed = allowed - {K.AUTOSTART_ON} if guest.autostart else allowed - {K.AUTOSTART_OFF}
    return [k.value for k in K if k in allowed]


def refusal(guest: Guest, kind: str) -> str | None:
    """Why the guest cannot take the action now, or None when it can."""
    if kind in allowed_actions(guest):
        return None
    label = Job.Kind(kind).label if kind in Job.Kind.values else kind
    if guest.autodestroy and kind in NOT_FOR_AUTODESTROY:
        return (
            f"{label} is not possible for {guest.name}: it is autodestroyed with the "
            f"connection that started it, so {NOT_FOR_AUTODESTROY[kind]}"
        )
    if kind == K.MAKE_PERSISTENT and guest.persistent:
        return f"{guest.name} is persistent already"
    return f"{label} is not possible while {guest.name} is {guest.get_state_display().lower()}"


def guest_action(*, guest: Guest, kind: str, by: AbstractBaseUser | None, **options: Any) -> Job:
    """Open a job for the action (GuestBusy if another runs) and queue it after commit."""
    return jobs.job_ask(
        guest,
        kind,
        by,
        f"guest.{kind}"[:40],
        refused=(refusal(guest, kind), ActionRefused),
        data=options,
        note=f"{Job.Kind(kind).label} requested",
        changes=_asked(options),
    )


def _asked(options: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (None, v) for k, v in options.items()}


def save_path(guest: Guest) -> str:
    """Where a guest's memory is saved to (a portal-chosen file, never a user's)."""
    return str(settings.SAVE_DIR / f"{guest.uuid}.save")


def saved_transient(guest: Guest) -> DomainInfo | None:
    """A transient guest saved to its file: libvirt forgets such a guest, the file is all there
    is of it, and restoring the file brings it back transient. None when there is no file."""
    if not Path(save_path(guest)).exists():
        return None
    return dataclasses.replace(
        DomainInfo.undefined(str(guest.uuid)),
        name=guest.name,
        state=GuestState.SAVED,
        reason="saved",
    )


def _save(hv: Hypervisor, guest: Guest) -> DomainInfo:
    settings.SAVE_DIR.mkdir(parents=True, exist_ok=True)
    info = operations.save(hv, str(guest.uuid), save_path(guest))
    if not info.exists:
        return saved_transient(guest) or info
    return info


def _restore(hv: Hypervisor, guest: Guest) -> DomainInfo:
    if operations.has_managed_save(hv, str(guest.uuid)):
        return operations.start(hv, str(guest.uuid))
    info = operations.restore(hv, save_path(guest))
    with contextlib.suppress(FileNotFoundError):
        settings.SAVE_DIR.joinpath(f"{guest.uuid}.save").unlink()
    return info


def _delete(hv: Hypervisor, guest: Guest, keep_disk: bool = False) -> DomainInfo:
    uuid = str(guest.uuid)
    volumes: list[tuple[str | None, str | None]] = []
    seeds: list[tuple[str | None, str | None]] = []
    try:
        root = domxml.parse_untrusted(operations.get_xml(hv, uuid, inactive=True))
    except NotFound:
        pass
    else:
        volumes = [
            (s.get("pool"), s.get("volume"))
            for s in root.iterfind("devices/disk[@device='disk']/source")
            if s.get("pool") and s.get("volume")
        ]
        seeds = [
            (s.get("pool"), s.get("volume"))
            for s in root.iterfind("devices/disk[@device='cdrom']/source")
            if s.get("pool") and s.get("volume") == seed_volume(guest)
        ]
    operations.destroy(hv, uuid)
    snapshots.drop_all(hv, guest)  # inside the disks, which go (or are kept as they are)
    operations.undefine(hv, uuid)
    if not keep_disk:
        for pool, volume in volumes:
            storage.delete_volume(hv, str(pool), str(volume))
    # The cloud-init seed is the portal's, not the owner's data: it goes with the guest.
    for pool, volume in seeds:
        storage.delete_volume(hv, str(pool), str(volume))
    stats.forget_guest(uuid)
    return DomainInfo.undefined(uuid)


def _make_persistent(hv: Hypervisor, guest: Guest) -> DomainInfo:
    """defineXML with the running transient guest's live config, as the lifecycle guide says:
    it runs on, and is "defined" (stopped, not gone) after it next shuts down."""
    uuid = str(guest.uuid)
    return operations.make_persistent(hv, uuid, operations.get_xml(hv, uuid))


def _shutdown(hv: Hypervisor, guest: Guest) -> tuple[DomainInfo, str]:
    """Ask the guest to shut down through its agent when it is there, else by ACPI; the state
    after, and how it was asked (for the job's log)."""
    uuid = str(guest.uuid)
    fallback = ""
    if operations.agent_connected(hv, uuid):
        try:
            return operations.shutdown(hv, uuid, agent=True), "through the guest agent"
        except (WrongState, NotFound):
            raise
        except HypervisorError as exc:
            fallback = f" (the guest agent did not take it: {exc})"
    return operations.shutdown(hv, uuid), f"by ACPI, the power button{fallback}"


ACTIONS: dict[str, Callable[..., DomainInfo]] = {
    K.START: lambda hv, g, **o: operations.start(hv, str(g.uuid), paused=o.get("paused", False)),
    K.SHUTDOWN: lambda hv, g, **o: operations.shutdown(hv, str(g.uuid)),
    K.FORCE_OFF: lambda hv, g, **o: operations.destroy(hv, str(g.uuid)),
    K.REBOOT: lambda hv, g, **o: operations.reboot(hv, str(g.uuid)),
    K.SUSPEND: lambda hv, g, **o: operations.suspend(hv, str(g.uuid)),
    K.RESUME: lambda hv, g, **o: operations.resume(hv, str(g.uuid)),
    K.SAVE: lambda hv, g, **o: _save(hv, g),
    K.RESTORE: lambda hv, g, **o: _restore(hv, g),
    K.MANAGED_SAVE: lambda hv, g, **o: operations.managed_save(hv, str(g.uuid)),
    K.AUTOSTART_ON: lambda hv, g, **o: operations.set_autostart(hv, str(g.uuid), True),
    K.AUTOSTART_OFF: lambda hv, g, **o: operations.set_autostart(hv, str(g.uuid), False),
    K.DELETE: lambda hv, g, **o: _delete(hv, g, keep_disk=o.get("keep_disk", False)),
    K.MAKE_PERSISTENT: lambda hv, g, **o: _make_persistent(hv, g),
    K.SNAPSHOT: lambda hv, g, **o: snapshots.run_snapshot(hv, g, **o),
    K.REVERT: lambda hv, g, **o: snapshots.run_revert(hv, g, **o),
    K.SNAPSHOT_DELETE: lambda hv, g, **o: snapshots.run_delete(hv, g, **o),
}


def run_job(job_id: int) -> None:
    """Run one queued lifecycle job: claim it, call libvirt, record the guest's new state."""
    job = Job.objects.select_related("guest__host").get(pk=job_id)
    guest = job.guest
    uuid = guest.uuid if guest is not None else ""
    try:
        transitions.job_move(
            job_id,
            expected=Job.Status.QUEUED,
            to=Job.Status.RUNNING,
            progress=job.progress,
            guest_uuid=uuid,
        )
    except transitions.StaleState:
        return  # another worker has it, or it was cancelled
    if guest is None:
        transitions.job_move(
            job_id, expected=Job.Status.RUNNING, to=Job.Status.FAILED, error="no guest"
        )
        return
    hv = get_hypervisor(guest.host.uri)

    def end(to: Job.Status, error: str = "") -> None:
        transitions.job_move(
            job_id, expected=Job.Status.RUNNING, to=to, error=error, guest_uuid=guest.uuid
        )

    how = ""
    try:
        if job.kind == K.SHUTDOWN:
            info, how = _shutdown(hv, guest)
        else:
            info = ACTIONS[job.kind](hv, guest, **job.data)
    except (WrongState, NotFound) as exc:
        # The guest is not where the portal thought: record the truth and say so.
        guest_sync_state(
            host=guest.host, info=operations.get_info(hv, str(guest.uuid)), guest=guest
        )
        end(Job.Status.FAILED, str(exc))
        return
    except HypervisorError as exc:
        end(Job.Status.FAILED, str(exc))
        raise
    if job.kind == K.SHUTDOWN:
        transitions.job_log(
            job_id, f"Asked the guest to shut down {how}", progress=50, guest_uuid=uuid
        )
    if job.kind == K.SHUTDOWN and info.active:
        guest_sync_state(host=guest.host, info=info, guest=guest)
        # The guest powers off in its own time; the listener (or reconcile) ends the job.
        deadline = timezone.now() + timedelta(
            seconds=job.data.get("timeout", SHUTDOWN_TIMEOUT.seconds)
        )
        Job.objects.filter(pk=job_id).update(deadline=deadline)
        # The guest may have stopped (and the listener come and gone) meanwhile: look again.
        info = operations.get_info(hv, str(guest.uuid))
        if not info.active:
            guest_sync_state(host=guest.host, info=info, guest=guest)
            job_domain_stopped(guest, info)
        return
    # The guest's new state and the job's end in one commit, so no page shows one without
    # the other.
    with transaction.atomic():
        guest_sync_state(host=guest.host, info=info, guest=guest)
        end(Job.Status.SUCCEEDED)
    if job.kind in (K.START, K.RESTORE, K.REBOOT) and info.active:
        addresses.watch_after_start(guest, guest.host)


def job_domain_stopped(guest: Guest, info: DomainInfo) -> None:
    """A guest stopped: a shutdown job waiting for it is done."""
    if info.active:
        return
    for job in Job.objects.filter(guest=guest, kind=K.SHUTDOWN, status=Job.Status.RUNNING):
        with contextlib.suppress(transitions.StaleState):
            transitions.job_move(job.pk, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)


def reconcile_jobs(
    hv: Hypervisor, guests: dict[str, Guest], domains: dict[str, DomainInfo], *, stale_after: float
) -> None:
    """Finish shutdown jobs whose guest stopped, force or fail those past their deadline; fail
    jobs whose worker died mid-run and queue again those whose message was lost."""
    now = timezone.now()
    lost = now - timedelta(seconds=settings.TASK_HARD_TIME_LIMIT + 30)
    migration_limit = settings.MIGRATION_TIME_LIMIT + 30
    for job in (
        Job.objects.filter(
            status=Job.Status.RUNNING, started__lt=lost, guest__uuid__in=list(guests)
        )
        .exclude(kind__in=(K.SHUTDOWN, *Job.FOR_REQUESTS))
        .exclude(kind=K.MIGRATE, started__gte=now - timedelta(seconds=migration_limit))
    ):
        transitions.job_move(
            job.pk, expected=Job.Status.RUNNING, to=Job.Status.FAILED, error="the worker was lost"
        )
    for job in (
        Job.objects.filter(
            status=Job.Status.QUEUED,
            created__lt=now - timedelta(seconds=stale_after),
            guest__uuid__in=list(guests),
        )
        # Requests' jobs are moved on by their request's steps (re-queued by reconcile_requests);
        # run_job has no action for them.
        .exclude(kind__in=Job.FOR_REQUESTS)
        .select_related("guest__host")
    ):
        assert job.guest is not None
        task = queue.RUN_MIGRATION if job.kind == K.MIGRATE else queue.RUN_JOB
        queue.send(task, job.pk, queue=job.guest.host.queue)
    for job in Job.objects.filter(
        kind=K.SHUTDOWN, status=Job.Status.RUNNING, guest__uuid__in=list(guests)
    ).select_related("guest"):
        assert job.guest is not None
        info = domains.get(str(job.guest.uuid), DomainInfo.undefined(str(job.guest.uuid)))
        if not info.active:
            job_domain_stopped(job.guest, info)
        elif job.deadline and job.deadline < now:
            if job.data.get("force"):
                info = operations.destroy(hv, str(job.guest.uuid))
                guest_sync_state(host=job.guest.host, info=info)
                transitions.job_log(job.pk, "Graceful shutdown timed out; forced off")
                transitions.job_move(job.pk, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)
            else:
                transitions.job_move(
                    job.pk,
                    expected=Job.Status.RUNNING,
                    to=Job.Status.FAILED,
                    error="the guest did not shut down before the deadline",
                )
