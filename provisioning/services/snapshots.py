"""Snapshots of guests: asked for here, taken, reverted and deleted by jobs, mirrored from libvirt.

libvirt holds the truth (`hypervisor.snapshots`); the Snapshot rows are made again from its list
after every snapshot job and by reconcile, so a worker that dies at any step leaves what libvirt
has, one snapshot or none, and the rows agree with it at the next look. A snapshot someone made
or deleted with virsh is adopted or forgotten the same way.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from provisioning import faults
from provisioning.channels import guest_channel
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor import snapshots as hvsnapshots
from provisioning.hypervisor.connection import Hypervisor
from provisioning.hypervisor.errors import HypervisorError, NotFound
from provisioning.hypervisor.types import DomainInfo
from provisioning.models import SNAPSHOT_NAME_MAX, Guest, Host, Job, Quota, Snapshot
from provisioning.services import audit, jobs, transitions
from vmportal.heartbeat import client

K = Job.Kind
S = Guest.State
KINDS = (K.SNAPSHOT, K.REVERT, K.SNAPSHOT_DELETE)
# Where the crash tests kill the worker (provisioning.faults).
CRASH_POINTS = (
    "snapshot:begin",
    "snapshot:taken",
    "snapshot:recorded",
    "revert:done",
    "snapshot-delete:done",
)
log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")
BAD_NAME = (
    "A snapshot's name is 1 to 50 letters, digits, dots, dashes or underscores, "
    "starting with a letter or digit."
)
DEFAULT_PER_GUEST = 5
# The states each snapshot job starts from (saved: the managed-save image and a revert would
# disagree about the guest's memory).
FROM_STATES: dict[str, tuple[str, ...]] = {
    K.SNAPSHOT: (S.RUNNING, S.PAUSED, S.DEFINED),
    K.REVERT: (S.RUNNING, S.PAUSED, S.DEFINED),
    K.SNAPSHOT_DELETE: (S.RUNNING, S.PAUSED, S.DEFINED, S.SAVED),
}


class SnapshotRefused(ValueError):
    """The snapshot action cannot be asked for; the message says why."""


def per_guest_limit(user: Any) -> int:
    """How many snapshots each of the user's guests may hold."""
    quota = Quota.objects.filter(user_id=user.pk).first() if user is not None else None
    return quota.max_snapshots_per_guest if quota else DEFAULT_PER_GUEST


def refusal(
    guest: Guest,
    kind: str,
    *,
    name: str = "",
    held: list[str] | None = None,
    limit: int | None = None,
) -> str | None:
    """Why the guest cannot take this snapshot action now, or None when it can.

    held (the names of its snapshots) and limit (its quota) save the queries when the caller
    has them already.
    """
    label = Job.Kind(kind).label
    if guest.autodestroy:
        # The lifecycle guide: autodestroy blocks snapshots (and save and migration).
        return (
            f"{label} is not possible for {guest.name}: it is autodestroyed with the "
            "connection that started it, and libvirt takes no snapshots of such a guest"
        )
    if guest.state not in FROM_STATES[kind]:
        return f"{label} is not possible while {guest.name} is {guest.get_state_display().lower()}"
    names = held if held is not None else list(guest.snapshots.values_list("name", flat=True))
    if kind == K.SNAPSHOT:
        limit = limit if limit is not None else per_guest_limit(guest.owner)
        if len(names) >= limit:
            count = len(names)
            return (
                f"{guest.name} holds {count} snapshot{'s' if count != 1 else ''}, as many as "
                f"your quota allows per guest ({limit}); delete one first"
            )
        if name and name in names:
            return f"{guest.name} has a snapshot named {name} already"
    elif name and name not in names:
        return f"{guest.name} has no snapshot named {name}"
    return None


def _ask(guest: Guest, kind: str, by: AbstractBaseUser | None, data: dict[str, Any]) -> Job:
    audited: dict[str, str] = {K.SNAPSHOT: "snapshot.take", K.REVERT: "snapshot.revert"}
    name = data["name"]
    return jobs.job_ask(
        guest,
        kind,
        by,
        audited.get(kind, "snapshot.delete"),
        refused=(refusal(guest, kind, name=name), SnapshotRefused),
        data=data,
        note=f"{Job.Kind(kind).label} requested: {name}",
        about=name,
        changes={"snapshot": (None, name)},
    )


def scheduled_prefix(schedule_id: int) -> str:
    """What the names of one schedule's snapshots start with (its retention keeps to these)."""
    return f"auto-{schedule_id}-"


def snapshot_take(
    *,
    guest: Guest,
    by: AbstractBaseUser | None,
    name: str = "",
    description: str = "",
    keep: int = 0,
    schedule: int | None = None,
) -> Job:
    """Ask for a snapshot of the guest (a job); SnapshotRefused or GuestBusy when it cannot.

    With a schedule and keep, the job then deletes that schedule's oldest snapshots beyond the
    newest `keep`: after the new one is taken, never before.
    """
    name = name.strip() or timezone.now().strftime("snap-%Y%m%d-%H%M%S")
    if not NAME.fullmatch(name):
        raise SnapshotRefused(BAD_NAME)
    description = " ".join(description.split())
    if len(description) > 200:
        raise SnapshotRefused("A snapshot's description is at most 200 characters.")
    data: dict[str, Any] = {"name": name, "description": description}
    if schedule is not None and keep:
        data.update(keep=keep, schedule=schedule)
    return _ask(guest, K.SNAPSHOT, by, data)


def snapshot_revert(*, guest: Guest, name: str, by: AbstractBaseUser | None) -> Job:
    """Ask for the guest to go back to one of its snapshots (a job)."""
    return _ask(guest, K.REVERT, by, {"name": name})


def snapshot_delete(*, guest: Guest, name: str, by: AbstractBaseUser | None) -> Job:
    """Ask for one of the guest's snapshots to be deleted (a job)."""
    return _ask(guest, K.SNAPSHOT_DELETE, by, {"name": name})


def what_revert_loses(guest: Guest, snapshot: Snapshot) -> str:
    """The words the page's confirmation uses: what going back to `snapshot` throws away."""
    when = timezone.localtime(snapshot.taken).strftime("%Y-%m-%d %H:%M:%S")
    lost = f"Everything written to {guest.name}'s disks since {when} is lost"
    if snapshot.memory:
        after = "running" if snapshot.state == "running" else "paused"
        return f"{lost}, and its memory now: it comes back {after} as it was then."
    return f"{lost}; it comes back stopped, as it was then."


# --- in the worker ---------------------------------------------------------------------------


def _disk_bytes(hv: Hypervisor, uuid: str) -> int | None:
    """What the guest's pool disks hold on the host now, in all (None when unknown)."""
    try:
        root = domxml.parse_untrusted(operations.get_xml(hv, uuid, inactive=True))
        total = 0
        for source in root.iterfind("devices/disk[@device='disk']/source"):
            pool, volume = source.get("pool"), source.get("volume")
            if pool and volume:
                total += storage.get_volume(hv, pool, volume).allocation
        return total
    except HypervisorError:
        return None


def run_snapshot(
    hv: Hypervisor,
    guest: Guest,
    *,
    name: str,
    description: str = "",
    keep: int = 0,
    schedule: int | None = None,
) -> DomainInfo:
    uuid = str(guest.uuid)
    before = _disk_bytes(hv, uuid)
    faults.checkpoint("snapshot:begin")  # the crash tests die here, at each step
    hvsnapshots.create_snapshot(hv, uuid, name, description)
    faults.checkpoint("snapshot:taken")
    after = _disk_bytes(hv, uuid)
    size = after - before if before is not None and after is not None else None
    sync(hv, guest, sizes={name: max(0, size)} if size is not None else None)
    faults.checkpoint("snapshot:recorded")
    if schedule is not None and keep:
        _prune(hv, guest, scheduled_prefix(schedule), keep)
    return operations.get_info(hv, uuid)


def _prune(hv: Hypervisor, guest: Guest, prefix: str, keep: int) -> None:
    """Delete the oldest of one schedule's snapshots beyond the newest `keep`."""
    theirs = list(guest.snapshots.filter(name__startswith=prefix).order_by("taken", "name"))
    for old in theirs[: max(0, len(theirs) - keep)]:
        hvsnapshots.delete_snapshot(hv, str(guest.uuid), old.name)
    if len(theirs) > keep:
        sync(hv, guest)


def run_revert(hv: Hypervisor, guest: Guest, *, name: str) -> DomainInfo:
    info = hvsnapshots.revert_snapshot(hv, str(guest.uuid), name)
    faults.checkpoint("revert:done")
    sync(hv, guest)
    return info


def run_delete(hv: Hypervisor, guest: Guest, *, name: str) -> DomainInfo:
    hvsnapshots.delete_snapshot(hv, str(guest.uuid), name)
    faults.checkpoint("snapshot-delete:done")
    sync(hv, guest)
    return operations.get_info(hv, str(guest.uuid))


def sync(hv: Hypervisor, guest: Guest, *, sizes: dict[str, int] | None = None) -> tuple[int, int]:
    """Make the guest's rows what libvirt lists: (adopted, forgotten)."""
    try:
        listed = hvsnapshots.list_snapshots(hv, str(guest.uuid))
    except NotFound:
        listed = []
    return sync_listed(guest, listed, sizes=sizes)


def sync_listed(
    guest: Guest,
    listed: list[hvsnapshots.SnapshotInfo],
    *,
    sizes: dict[str, int] | None = None,
) -> tuple[int, int]:
    kept = [s for s in listed if len(s.name) <= SNAPSHOT_NAME_MAX]
    if len(kept) < len(listed):
        log.warning(
            "guest %s: %d snapshot(s) with names over %d characters are not shown",
            guest.uuid,
            len(listed) - len(kept),
            SNAPSHOT_NAME_MAX,
        )
    listed = kept
    with transaction.atomic():
        rows = {s.name: s for s in Snapshot.objects.select_for_update().filter(guest=guest)}
        names = {s.name for s in listed}
        gone = [row.pk for name, row in rows.items() if name not in names]
        Snapshot.objects.filter(pk__in=gone).delete()
        adopted = 0
        for info in listed:
            fields = {
                "description": info.description[:200],
                "taken": dt.datetime.fromtimestamp(info.created, tz=dt.UTC),
                "state": info.state[:16],
                "memory": info.memory,
                "current": info.current,
                "parent": (info.parent or "")[:SNAPSHOT_NAME_MAX],
            }
            if sizes and info.name in sizes:
                fields["size_bytes"] = sizes[info.name]
            row = rows.get(info.name)
            if row is None:
                Snapshot.objects.create(guest=guest, name=info.name, **fields)
                adopted += 1
            elif any(getattr(row, k) != v for k, v in fields.items()):
                Snapshot.objects.filter(pk=row.pk).update(**fields)
    if adopted or gone:
        transitions.publish(guest_channel(guest.uuid), {"snapshots": len(listed)})
    return adopted, len(gone)


def drop_all(hv: Hypervisor, guest: Guest) -> None:
    """Forget the guest's snapshots in libvirt and here, as its disks go (rebuild, delete)."""
    hvsnapshots.delete_all_metadata(hv, str(guest.uuid))
    Snapshot.objects.filter(guest=guest).delete()


def reconcile_host(
    hv: Hypervisor, host: Host, guests: dict[str, Guest], domains: dict[str, DomainInfo]
) -> tuple[int, int]:
    """Adopt and forget snapshots made or deleted outside the portal: (adopted, forgotten).

    Listing costs a call per guest, so the whole host is looked at once every
    settings.SNAPSHOT_RECONCILE_SECONDS; guests whose snapshot job ended lately (a worker that
    died mid-way among them) are looked at on every pass.
    """
    recent = timezone.now() - dt.timedelta(seconds=RECENT_JOB_SECONDS)
    wanted = set(
        str(u)
        for u in Job.objects.filter(guest__host=host, kind__in=KINDS)
        .filter(Q(completed__gte=recent) | Q(status=Job.Status.RUNNING))
        .values_list("guest__uuid", flat=True)
    )
    if _full_pass_due(host):
        wanted |= set(guests)
    busy = set(
        str(u)
        for u in Job.objects.filter(guest__host=host, status__in=Job.ACTIVE).values_list(
            "guest__uuid", flat=True
        )
    )
    adopted = forgotten = 0
    for uuid in sorted(wanted - busy):
        guest = guests.get(uuid)
        if guest is None:
            continue
        if uuid in domains and domains[uuid].exists:
            try:
                listed = hvsnapshots.list_snapshots(hv, uuid)
            except NotFound:
                listed = []
        elif not guest.snapshots.exists():
            continue
        else:
            listed = []
        a, f = sync_listed(guest, listed)
        adopted, forgotten = adopted + a, forgotten + f
        if a or f:
            audit.record(
                "snapshot.reconcile",
                guest,
                detail=f"adopted {a}, forgot {f} (made or deleted outside the portal)",
            )
    return adopted, forgotten


RECENT_JOB_SECONDS = 120


def _full_pass_due(host: Host) -> bool:
    try:
        return bool(
            client().set(
                f"vmportal:snapshot-reconcile:{host.pk}",
                "1",
                nx=True,
                ex=max(1, int(settings.SNAPSHOT_RECONCILE_SECONDS)),
            )
        )
    except redis.RedisError:
        return False  # the next pass with Redis back looks
