"""Reads for pages and live streams: what a user may see, and what each page shows.

Views and streams both call these, so a page and its live updates never disagree; nothing here
writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Q, QuerySet

from provisioning.hypervisor import domxml, operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    Job,
    JobEvent,
    ProvisioningRequest,
    ScheduleRun,
)
from provisioning.services import (
    actions,
    consoles,
    placement,
    quotas,
    snapshots,
    stats,
    transitions,
)

User = AbstractBaseUser | AnonymousUser
LOG_LINES_SHOWN = 30


def is_staff(user: User) -> bool:
    """Whether the user sees every guest (staff), not only their own."""
    return bool(getattr(user, "is_staff", False))


def guests_of(user: User) -> QuerySet[Guest]:
    """The guests a user may see: their own, or every guest for staff."""
    guests = Guest.objects.all()
    return guests if is_staff(user) else guests.filter(owner_id=user.pk)


def requests_of(user: User) -> QuerySet[ProvisioningRequest]:
    """The requests a user may see: their own, or every request for staff."""
    requests = ProvisioningRequest.objects.all()
    return requests if is_staff(user) else requests.filter(owner_id=user.pk)


def quota_bars(user: AbstractBaseUser) -> list[dict[str, Any]]:
    """The user's use of each quota, as bars."""
    usage, limits = quotas.usage_of(user), quotas.limits_of(user)
    bars = []
    for field, label, unit in (
        ("guests", "Guests", ""),
        ("vcpus", "vCPUs", ""),
        ("memory_mib", "Memory", " MiB"),
        ("disk_mib", "Disk", " MiB"),
    ):
        used, most = getattr(usage, field), getattr(limits, field)
        percent = min(100, round(100 * used / most)) if most else 100
        bars.append({"label": label, "used": used, "max": most, "unit": unit, "percent": percent})
    return bars


def quota_left(user: AbstractBaseUser) -> dict[str, int]:
    """What the user may still ask for."""
    usage, limits = quotas.usage_of(user), quotas.limits_of(user)
    return {
        "guests": limits.guests - usage.guests,
        "vcpus": limits.vcpus - usage.vcpus,
        "memory_mib": limits.memory_mib - usage.memory_mib,
        "disk_mib": limits.disk_mib - usage.disk_mib,
    }


@dataclass(frozen=True)
class GuestFilters:
    """The dashboard's filters: a search, and for staff an owner and a host."""

    query: str = ""
    owner: str = ""
    host: str = ""


def guest_list(*, user: User, filters: GuestFilters) -> QuerySet[Guest]:
    """The dashboard's rows: the guests that exist, filtered, in a stable order."""
    guests = (
        guests_of(user)
        .exclude(state=Guest.State.UNDEFINED)
        .select_related("host", "template", "owner")
    )
    if filters.query:
        guests = guests.filter(
            Q(name__icontains=filters.query) | Q(owner__username__icontains=filters.query)
        )
    if is_staff(user) and filters.owner:
        guests = guests.filter(owner__username=filters.owner)
    if is_staff(user) and filters.host:
        guests = guests.filter(host__name=filters.host)
    return guests.order_by("name", "id")


def hosts_down(hosts: list[Host]) -> set[int]:
    """The ids of the hosts whose listener has gone silent."""
    return {h.pk for h in hosts if placement.host_is_down(h)}


def dashboard_extras(user: User, hosts: list[Host]) -> dict[str, Any]:
    """The rest of the full dashboard: latest requests and jobs, quota, staff's filter lists."""
    extras: dict[str, Any] = {
        "requests": requests_of(user).select_related("template").order_by("-created")[:8],
        "jobs": Job.objects.filter(guest__in=guests_of(user))
        .select_related("guest")
        .order_by("-created")[:8],
    }
    if isinstance(user, AbstractBaseUser):
        extras["quota"] = quota_bars(user)
    if is_staff(user):
        extras["hosts"] = [h.name for h in hosts]
        extras["owners"] = list(
            get_user_model()
            .objects.filter(guests__isnull=False)
            .distinct()
            .values_list("username", flat=True)[:200]
        )
    return extras


def request_job(req: ProvisioningRequest) -> Job | None:
    """The job a request runs under (its provision or rebuild job)."""
    return req.jobs.filter(kind__in=Job.FOR_REQUESTS).order_by("-created").first()


def request_status(req: ProvisioningRequest) -> dict[str, Any]:
    """What the request page shows: its steps, its job's log and progress, the console."""
    job = request_job(req)
    log_lines = (
        list(
            JobEvent.objects.filter(job=job)
            .exclude(kind=JobEvent.Kind.CONSOLE)
            .order_by("-created", "-id")[:LOG_LINES_SHOWN]
        )[::-1]
        if job
        else []
    )
    console = consoles.console_tail(req.guest.uuid) if req.guest else ""
    return {
        "req": req,
        "job": job,
        "steps": list(req.events.all()),
        "log_lines": log_lines,
        "console": console,
        "progress": job.progress if job else 0,
        "cancellable": transitions.is_cancellable(req.status),
    }


def guest_status(guest: Guest) -> dict[str, Any]:
    """What the guest page shows of its state: actions, jobs, schedules, hosts."""
    jobs = list(guest.jobs.select_related("created_by").order_by("-created")[:20])
    active = next((j for j in jobs if j.status in Job.ACTIVE), None)
    newer = (
        guest.template is not None
        and guest.template_version is not None
        and guest.template.version > guest.template_version
    )
    schedules = list(
        guest.schedules.select_related("periodic_task__interval", "periodic_task__crontab")
    )
    runs = list(
        ScheduleRun.objects.filter(schedule__guest=guest).select_related("job", "schedule")[:20]
    )
    return {
        "guest": guest,
        "schedules": schedules,
        "runs": runs,
        "can_rebuild": active is None
        and guest.template is not None
        and guest.state != Guest.State.UNDEFINED,
        "jobs": jobs,
        "active_job": active,
        "actions": [] if active else actions.allowed_actions(guest),
        "action_labels": dict(Job.Kind.choices),
        "newer_template": newer,
        "host_down": placement.host_is_down(guest.host),
        "other_hosts": list(Host.objects.exclude(pk=guest.host_id).filter(enabled=True)),
        "ssh_line": ssh_line(guest),
        "console_sessions": list(
            guest.console_sessions.filter(opened__isnull=False).select_related("user")[:10]
        ),
        "console_open": guest.state in (Guest.State.RUNNING, Guest.State.PAUSED),
        **guest_snapshots(guest, busy=active is not None),
    }


def guest_snapshots(guest: Guest, *, busy: bool) -> dict[str, Any]:
    """The guest page's snapshot list, what each revert would lose, and what may be asked."""
    listed = list(guest.snapshots.all())
    for snap in listed:
        snap.loses = snapshots.what_revert_loses(guest, snap)  # type: ignore[attr-defined]
    # Two queries in all (the list and the quota): the live stream renders this on every change.
    held = [s.name for s in listed]
    limit = snapshots.per_guest_limit(guest.owner)

    def refused(kind: str) -> str | None:
        return snapshots.refusal(guest, kind, held=held, limit=limit)

    take = None if busy else refused(Job.Kind.SNAPSHOT)
    return {
        "snapshots": listed,
        "snapshot_limit": limit,
        "can_snapshot": not busy and take is None,
        "snapshot_refusal": take or "",
        "can_revert": not busy and refused(Job.Kind.REVERT) is None,
        "can_delete_snapshot": not busy and refused(Job.Kind.SNAPSHOT_DELETE) is None,
    }


def ssh_line(guest: Guest) -> str:
    """`ssh user@address` for a running guest with an IPv4 address ("" without one); the user
    is the cloud image's default user, who has the owner's keys."""
    if guest.state != Guest.State.RUNNING:
        return ""
    ipv4 = [a["ip"] for a in guest.addresses if a.get("family") == "ipv4"]
    if not ipv4:
        return ""
    template = guest.template
    if template is not None and template.method == GuestTemplate.Method.CLOUD:
        return f"ssh {template.cloud_user}@{ipv4[0]}"
    return f"ssh {ipv4[0]}"


def guest_xml(guest: Guest) -> tuple[str, str]:
    """The guest's live domain XML from its host, or why there is none: (xml, error)."""
    if guest.state == Guest.State.UNDEFINED:
        return "", ""
    try:
        hv = get_hypervisor(guest.host.uri, readonly=True)
        return domxml.pretty(operations.get_xml(hv, str(guest.uuid))), ""
    except HypervisorError as exc:
        return "", f"Host {guest.host} did not answer: {exc}"


def guest_badges(
    *, owner_id: int | None, limit: int = 500
) -> list[tuple[str, str, str, str, list[str]]]:
    """(uuid, state, reason, label, addresses) of the guests a dashboard shows live.

    Rows of a silent host are left out: they keep the page's "unreachable".
    """
    down = [h.pk for h in Host.objects.only("pk", "last_seen") if placement.host_is_down(h)]
    guests = Guest.objects.exclude(state=Guest.State.UNDEFINED).exclude(host_id__in=down)
    if owner_id is not None:
        guests = guests.filter(owner_id=owner_id)
    return [
        (str(g.uuid), g.state, g.state_reason, g.get_state_display(), g.address_list)
        for g in guests.only("uuid", "state", "state_reason", "addresses").order_by(
            "-state_changed"
        )[:limit]
    ]


def console_tail(guest: Guest) -> str:
    """The end of the guest's serial console log."""
    return consoles.console_tail(guest.uuid)


# The dashboard's CPU sparkline: a polyline in a box this size (SVG user units).
SPARK_WIDTH, SPARK_HEIGHT = 60, 16


def cpu_sparklines(guests: list[Guest]) -> None:
    """Give each listed guest `spark` (SVG polyline points of its last minutes of CPU %) and
    `cpu_now`, or neither when nothing was sampled; one Redis read for the page, no libvirt."""
    try:
        recent = stats.recent_cpu([g.uuid for g in guests])
    except redis.RedisError:
        return  # the table is still worth showing without its sparklines
    for guest in guests:
        cpu = recent.get(str(guest.uuid))
        if not cpu:
            continue
        if len(cpu) == 1:
            cpu = cpu * 2
        step = SPARK_WIDTH / (len(cpu) - 1)
        guest.spark = " ".join(  # type: ignore[attr-defined]
            f"{i * step:.1f},{SPARK_HEIGHT - min(max(v, 0.0), 100.0) * SPARK_HEIGHT / 100:.1f}"
            for i, v in enumerate(cpu)
        )
        guest.cpu_now = round(cpu[-1])  # type: ignore[attr-defined]


def guest_graphs(guest: Guest, range_name: str) -> dict[str, Any]:
    """A guest's usage series in one range (hour, day, week); KeyError for another range."""
    if range_name not in stats.TIERS:
        raise KeyError(range_name)
    return stats.series(guest.uuid, range_name)
