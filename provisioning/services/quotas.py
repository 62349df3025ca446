"""Quotas: what a user (and each group, all members together) may hold, checked at admission."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import connection
from django.db.models import Count, Q, Sum

from provisioning.models import Guest, ProvisioningRequest, Quota


@dataclass(frozen=True)
class Usage:
    """Guests, vCPUs, memory and disk held (or being built)."""

    guests: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0

    def plus(self, vcpus: int, memory_mib: int, disk_mib: int) -> Usage:
        return Usage(
            self.guests + 1,
            self.vcpus + vcpus,
            self.memory_mib + memory_mib,
            self.disk_mib + disk_mib,
        )


@dataclass(frozen=True)
class Limits:
    """The most one user or group may hold."""

    guests: int
    vcpus: int
    memory_mib: int
    disk_mib: int
    source: str

    @classmethod
    def of(cls, quota: Quota, source: str) -> Limits:
        return cls(
            quota.max_guests, quota.max_vcpus, quota.max_memory_mib, quota.max_disk_mib, source
        )


DEFAULT = Limits(guests=10, vcpus=16, memory_mib=32768, disk_mib=204800, source="default quota")


def _usage(owners: Q) -> Usage:
    # Requests whose guest is being built count against the quota as if it existed.
    building = ProvisioningRequest.objects.filter(status__in=ProvisioningRequest.BUILDING).values(
        "guest_id"
    )
    held = Guest.objects.filter(owners).filter(~Q(state=Guest.State.UNDEFINED) | Q(pk__in=building))
    totals = held.aggregate(
        guests=Count("id"),
        vcpus=Sum("vcpus"),
        memory_mib=Sum("memory_mib"),
        disk_mib=Sum("disk_mib"),
        data_disk_mib=Sum("data_disk_mib"),
    )
    counts = {k: int(v or 0) for k, v in totals.items()}
    counts["disk_mib"] += counts.pop("data_disk_mib")  # the disk quota covers both disks
    return Usage(**counts)


def usage_of(user: AbstractBaseUser) -> Usage:
    """What the user holds now."""
    return _usage(Q(owner_id=user.pk))


def limits_of(user: AbstractBaseUser) -> Limits:
    """The user's own limits: their quota row, else the default."""
    quota = Quota.objects.filter(user_id=user.pk).first()
    return Limits.of(quota, "your quota") if quota else DEFAULT


def _exceeds(usage: Usage, limits: Limits) -> str | None:
    for field, unit in (
        ("guests", ""),
        ("vcpus", ""),
        ("memory_mib", " MiB"),
        ("disk_mib", " MiB"),
    ):
        have, most = getattr(usage, field), getattr(limits, field)
        if have > most:
            label = field.removesuffix("_mib").replace("vcpus", "vCPUs")
            return (
                f"quota exceeded: {label} would be {have}{unit}, "
                f"{limits.source} allows {most}{unit}"
            )
    return None


def quota_lock(user: AbstractBaseUser) -> None:
    """Serialise admissions of this user and their groups (call inside a transaction).

    FOR NO KEY UPDATE, not FOR UPDATE: it must not block the foreign-key checks that every
    insert naming the user (guests, requests, jobs) makes at commit, or those inserts and this
    lock deadlock on PostgreSQL (seen under load).
    """
    if not connection.features.has_select_for_update:
        return  # SQLite: every write transaction here takes the one database lock already
    get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).first()
    list(Group.objects.select_for_update(no_key=True).filter(user__pk=user.pk).order_by("pk"))


def quota_problem(request: ProvisioningRequest) -> str | None:
    """Why admitting this request would break a quota, or None when it fits."""
    owner = request.owner
    extra = (request.vcpus, request.memory_mib, request.disk_mib + request.data_disk_mib)
    # The user's own quota and their groups' in one look-up.
    quotas = list(
        Quota.objects.filter(Q(user_id=owner.pk) | Q(group__user__pk=owner.pk))
        .select_related("group")
        .order_by("group_id")
    )
    own = next((q for q in quotas if q.user_id == owner.pk), None)
    limits = Limits.of(own, "your quota") if own else DEFAULT
    problem = _exceeds(usage_of(owner).plus(*extra), limits)
    if problem:
        return problem
    for quota in quotas:
        if quota.group is None:
            continue
        group_usage = _usage(Q(owner__groups=quota.group)).plus(*extra)
        problem = _exceeds(group_usage, Limits.of(quota, f"group {quota.group.name}'s quota"))
        if problem:
            return problem
    return None
