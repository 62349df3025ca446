"""The API's request and response bodies (pydantic, via django-ninja): its OpenAPI contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from ninja import Schema
from pydantic import Field, StringConstraints

# Free text: anything printable a database keeps (no NUL, which PostgreSQL refuses).
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
Size = Annotated[int, Field(ge=0, le=2**31 - 1)]
Id = Annotated[int, Field(ge=1, le=2**53)]


class FieldError(Schema):
    field: str
    message: str


class Problem(Schema):
    """An error, as RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[FieldError] = []


class SizeRange(Schema):
    min: int
    default: int
    max: int


class TemplateOut(Schema):
    id: int
    name: str
    description: str
    version: int
    method: str
    lifecycle: str
    libvirt_summary: str
    vcpus: SizeRange
    memory_mib: SizeRange
    disk_mib: SizeRange
    data_disk_mib: SizeRange
    start_paused: bool
    autostart: bool
    autodestroy: bool
    takes_ssh_keys: bool
    takes_cloud_config: bool


class Address(Schema):
    ip: str
    prefix: int | None = None
    mac: str = ""
    family: str = ""
    source: str = ""


class SnapshotOut(Schema):
    name: str
    description: str
    taken: datetime
    state: str = Field(description="The guest's state when taken (running, paused, shutoff).")
    memory: bool = Field(description="Holds the guest's memory too (taken while it ran).")
    current: bool = Field(description="The snapshot the guest last came from.")
    size_bytes: int | None = Field(description="What the disks grew by when it was taken.")


class SnapshotList(Schema):
    items: list[SnapshotOut]
    limit: int = Field(description="How many snapshots the guest may hold (the owner's quota).")


class SnapshotIn(Schema):
    name: Annotated[Text, StringConstraints(max_length=50)] = Field(
        "", description="Letters, digits, dots, dashes, underscores; empty: one is made up."
    )
    description: Annotated[Text, StringConstraints(max_length=200)] = ""


class GuestStats(Schema):
    """A guest's usage in one range, as columns of equal length, oldest first (null: unknown)."""

    range: Literal["hour", "day", "week"]
    step: float = Field(description="Seconds between points.")
    points: int = Field(description="Points the range holds at most.")
    t: list[int] = Field(description="Unix time of each point.")
    cpu: list[float | None] = Field(description="CPU use, % of the guest's vCPUs together.")
    mem: list[float | None] = Field(description="Memory used, bytes.")
    disk_read: list[float | None] = Field(description="Disk reads, bytes per second.")
    disk_write: list[float | None] = Field(description="Disk writes, bytes per second.")
    net_rx: list[float | None] = Field(description="Network received, bytes per second.")
    net_tx: list[float | None] = Field(description="Network sent, bytes per second.")


class GuestOut(Schema):
    uuid: UUID
    name: str
    owner: str
    host: str
    template: int | None
    template_version: int | None
    state: str
    state_reason: str
    state_changed: datetime | None
    persistent: bool
    autostart: bool
    autodestroy: bool
    vcpus: int
    memory_mib: int
    disk_mib: int
    data_disk_mib: int
    addresses: list[Address]
    agent_connected: bool
    created: datetime
    actions: list[str] = Field(description="The lifecycle actions the guest's state allows now.")
    url: str


class RequestOut(Schema):
    id: int
    kind: str
    name: str
    status: str
    status_label: str
    error: str
    template: int
    template_version: int
    guest: UUID | None
    host: str | None
    vcpus: int
    memory_mib: int
    disk_mib: int
    data_disk_mib: int
    job: int | None
    created: datetime
    updated: datetime
    completed: datetime | None
    url: str


class LogLine(Schema):
    time: datetime
    kind: str
    message: str
    progress: int | None = None


class JobOut(Schema):
    id: int
    kind: str
    status: str
    progress: int
    error: str
    guest: UUID | None
    request: int | None
    created: datetime
    started: datetime | None
    completed: datetime | None
    log: list[LogLine]
    url: str


class ScheduleOut(Schema):
    id: int
    guest: UUID
    action: Literal["rebuild", "snapshot"]
    keep: int | None = Field(description="Snapshot schedules: how many of theirs are kept.")
    every_minutes: int | None
    cron: str | None
    source: str
    keep_data_disk: bool
    enabled: bool
    created: datetime
    url: str


class QuotaFigures(Schema):
    guests: int
    vcpus: int
    memory_mib: int
    disk_mib: int


class QuotaOut(Schema):
    usage: QuotaFigures
    limits: QuotaFigures
    source: str


class SshKeyOut(Schema):
    id: int
    name: str
    fingerprint: str
    public_key: str
    created: datetime
    url: str


class HostOut(Schema):
    id: int
    name: str
    uri: str
    enabled: bool
    down: bool
    last_seen: datetime | None
    domain_type: str
    capacity_vcpus: int
    capacity_memory_mib: int
    capacity_disk_gib: int
    guests: int


def page_of(item: type[Schema], name: str) -> type[Schema]:
    """A page of `item`s with the cursor of the next page (null on the last)."""
    return type(
        name,
        (Schema,),
        {"__annotations__": {"items": list[item], "next": str | None}},  # type: ignore[valid-type]
    )


TemplatePage = page_of(TemplateOut, "TemplatePage")
GuestPage = page_of(GuestOut, "GuestPage")
RequestPage = page_of(RequestOut, "RequestPage")
SchedulePage = page_of(ScheduleOut, "SchedulePage")
SshKeyPage = page_of(SshKeyOut, "SshKeyPage")
HostPage = page_of(HostOut, "HostPage")


class RequestIn(Schema):
    template: Id
    name: Name
    vcpus: Size | None = None
    memory_mib: Size | None = None
    disk_mib: Size | None = None
    data_disk_mib: Size | None = None
    start_paused: bool | None = None
    autostart: bool | None = None
    autodestroy: bool | None = None
    ssh_keys: list[Id] = Field(default=[], max_length=100, description="Ids of your SSH keys.")
    cloud_config: Annotated[Text, StringConstraints(max_length=65536)] = ""


class ShutdownIn(Schema):
    force: bool = False


class RebuildIn(Schema):
    source: Literal["latest", "pinned"] = "latest"
    keep_data_disk: bool = True


class MigrateIn(Schema):
    dest: Id | None = Field(default=None, description="A host id; none: the portal picks.")
    bandwidth_mib: Annotated[int, Field(ge=1, le=100000)] | None = None


class ScheduleIn(Schema):
    action: Literal["rebuild", "snapshot"] = "rebuild"
    keep: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="Snapshot schedules: how many of theirs to keep (the oldest goes)."
    )
    every_minutes: Annotated[int, Field(ge=1, le=527040)] | None = None
    cron: Annotated[Text, StringConstraints(max_length=100)] = ""
    source: Literal["latest", "pinned"] = "latest"
    enabled: bool = True
    keep_data_disk: bool = True


class SchedulePatch(Schema):
    enabled: bool


class SshKeyIn(Schema):
    name: Annotated[Text, StringConstraints(max_length=100)] = ""
    public_key: Annotated[Text, StringConstraints(min_length=1, max_length=16384)]


class SshKeyPatch(Schema):
    name: Annotated[Text, StringConstraints(min_length=1, max_length=100)]
