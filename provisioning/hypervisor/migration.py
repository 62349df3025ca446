"""Moving a guest to another host: live (running guests) or offline (defined guests).

The client drives the migration (``virDomainMigrate3`` with connections to both daemons), so no
daemon needs credentials for the other. Both hosts must see the guest's disks at the same paths
(shared storage) unless ``copy_storage`` copies them into same-named pools on the destination.

``migrate`` blocks for the whole migration; run it in a worker and watch it from another thread
with ``migration_progress``, stop it with ``abort_migration``. A migration that failed or was
aborted leaves the guest where it was, running as before (libvirt rolls the destination back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from .connection import Hypervisor, close_quietly, enable_keepalive, open_connection
from .errors import (
    HypervisorError,
    InvalidConfig,
    NotFound,
    Unsupported,
    WrongState,
    classify,
)
from .operations import get_info, get_xml
from .types import DomainInfo, GuestState, constant_names

__all__ = [
    "MigrationAborted",
    "MigrationProgress",
    "SameHost",
    "UnsafeMigration",
    "abort_migration",
    "host_uuid",
    "migrate",
    "migration_progress",
]


class SameHost(InvalidConfig):
    """Source and destination are one host (same host UUID): libvirt refuses to migrate."""


class UnsafeMigration(InvalidConfig):
    """libvirt cannot prove the disks are safe to share (cache mode not 'none' on local storage).

    Pass ``unsafe=True`` when the storage is known to be shared, or give the disks cache='none'.
    """


class MigrationAborted(HypervisorError):
    """The migration was cancelled (``abort_migration``); the guest stayed on the source."""


_JOB_TYPES: dict[int, str] = constant_names(
    "VIR_DOMAIN_JOB_", ("NONE", "BOUNDED", "UNBOUNDED", "COMPLETED", "FAILED", "CANCELLED")
)
_JOB_OPERATIONS: dict[int, str] = constant_names(
    "VIR_DOMAIN_JOB_OPERATION_",
    (
        "UNKNOWN",
        "START",
        "SAVE",
        "RESTORE",
        "MIGRATION_IN",
        "MIGRATION_OUT",
        "SNAPSHOT",
        "SNAPSHOT_REVERT",
        "DUMP",
        "BACKUP",
        "SNAPSHOT_DELETE",
    ),
)
_ACTIVE_JOB_TYPES = frozenset({libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED})


@dataclass(frozen=True)
class MigrationProgress:
    """A guest's current (or, when asked, last completed) job as libvirt reports it."""

    uuid: str
    active: bool  # a job runs on the guest right now
    job_type: str  # 'none', 'unbounded', 'bounded', 'completed', 'failed', 'cancelled'
    operation: str  # 'migration_out', 'migration_in', 'save', ... or '' when not reported
    percent: float | None  # None when there is no job or no totals yet
    elapsed_ms: int | None = None
    data_total: int | None = None
    data_processed: int | None = None
    data_remaining: int | None = None
    memory_total: int | None = None
    memory_processed: int | None = None
    memory_remaining: int | None = None
    memory_bps: int | None = None
    disk_total: int | None = None
    disk_processed: int | None = None
    disk_remaining: int | None = None
    downtime_ms: int | None = None

    @property
    def migrating(self) -> bool:
        """True while an outgoing or incoming migration runs."""
        return self.active and self.operation in ("migration_out", "migration_in")


def _int(stats: dict[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if isinstance(value, int) else None


def _percent(total: int | None, processed: int | None, remaining: int | None) -> float | None:
    """Share done, from what remains when known: processed overshoots as dirty pages are resent."""
    if not total:
        return None
    if remaining is not None:
        done = total - remaining
    elif processed is not None:
        done = processed
    else:
        return None
    return max(0.0, min(100.0, 100.0 * done / total))


def _progress(uuid: str, stats: dict[str, Any]) -> MigrationProgress:
    job_type = _int(stats, "type") or libvirt.VIR_DOMAIN_JOB_NONE
    operation = _int(stats, libvirt.VIR_DOMAIN_JOB_OPERATION)
    data = [_int(stats, f"data_{k}") for k in ("total", "processed", "remaining")]
    memory = [_int(stats, f"memory_{k}") for k in ("total", "processed", "remaining")]
    disk = [_int(stats, f"disk_{k}") for k in ("total", "processed", "remaining")]
    percent = None
    if job_type != libvirt.VIR_DOMAIN_JOB_NONE:
        percent = _percent(*data)
        if percent is None:
            percent = _percent(*memory)
    return MigrationProgress(
        uuid=uuid,
        active=job_type in _ACTIVE_JOB_TYPES,
        job_type=_JOB_TYPES.get(job_type, f"type-{job_type}"),
        operation=_JOB_OPERATIONS.get(operation, "") if operation is not None else "",
        percent=percent,
        elapsed_ms=_int(stats, "time_elapsed"),
        data_total=data[0],
        data_processed=data[1],
        data_remaining=data[2],
        memory_total=memory[0],
        memory_processed=memory[1],
        memory_remaining=memory[2],
        memory_bps=_int(stats, "memory_bps"),
        disk_total=disk[0],
        disk_processed=disk[1],
        disk_remaining=disk[2],
        downtime_ms=_int(stats, "downtime"),
    )


def migration_progress(hv: Hypervisor, uuid: str, *, completed: bool = False) -> MigrationProgress:
    """The guest's running job on hv (percent None when none); NotFound for an unknown guest.

    With completed=True: the last finished job instead, e.g. on the destination after a
    migration (how long it took, how much it moved, the downtime).
    """
    flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
    return hv.call(lambda conn: _progress(uuid, conn.lookupByUUIDString(uuid).jobStats(flags)))


def abort_migration(hv: Hypervisor, uuid: str) -> bool:
    """Cancel the guest's running job on the source host hv; False if no job was running.

    Returns once libvirt accepted the cancel; the blocked ``migrate`` call then raises
    ``MigrationAborted``. NotFound when the guest is not on hv (e.g. it already left).
    """

    def run(conn: libvirt.virConnect) -> bool:
        dom = conn.lookupByUUIDString(uuid)
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            err = classify(exc)
            # "no job is active on the domain": nothing to cancel, also after a race with the end.
            if isinstance(err, WrongState) and dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return False
            raise err from exc
        return True

    # Not retried: after a lost connection, re-read the progress instead.
    return hv.call(run, idempotent=False)


def host_uuid(hv: Hypervisor) -> str:
    """The host UUID libvirt identifies the host by (capabilities host/uuid), lower-cased."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(hv.capabilities_xml().encode(), parser)
    text = root.findtext("host/uuid")
    if not text:
        raise HypervisorError(f"{hv.uri} reports no host UUID in its capabilities")
    return text.strip().lower()


def _volume_pools(xml: str) -> set[str]:
    """Names of the storage pools the domain's volume disks live in."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(xml.encode(), parser)
    return {
        pool
        for source in root.iterfind("devices/disk[@type='volume']/source")
        if (pool := source.get("pool"))
    }


def _refresh_pools(dconn: libvirt.virConnect, pools: set[str]) -> None:
    """Make dst's pools list volumes another host created in the shared folder since."""
    for name in sorted(pools):
        try:
            pool = dconn.storagePoolLookupByName(name)
            if pool.isActive():
                pool.refresh(0)
        except libvirt.libvirtError as exc:
            # A missing or stopped pool on dst: the migration's own error will name it.
            if not isinstance(classify(exc), NotFound | WrongState):
                raise


def _run_migration(
    src: Hypervisor, dst: Hypervisor, uuid: str, params: dict[str, Any], flags: int
) -> None:
    """migrate3 over connections of its own: the shared ones stay free for progress and abort.

    A call on a connection that is busy in migrate3's Perform phase waits until the migration
    ends (seen here with libvirt 9.0), so progress polled over src's shared connection would
    show nothing and an abort could not get through.
    """
    conn = open_connection(src.uri)
    try:
        enable_keepalive(conn)
        dconn = open_connection(dst.uri)
        try:
            enable_keepalive(dconn)
            dom = conn.lookupByUUIDString(uuid)
            # Blocks for the whole migration.
            dom.migrate3(dconn, params, flags)
        finally:
            close_quietly(dconn)
    except libvirt.libvirtError as exc:
        raise _explain(exc, uuid, dst) from exc
    finally:
        close_quietly(conn)


def _flags(*, live: bool, copy_storage: bool, unsafe: bool) -> int:
    flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    flags |= libvirt.VIR_MIGRATE_LIVE if live else libvirt.VIR_MIGRATE_OFFLINE
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if unsafe:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    return flags


def _params(migration_uri: str | None, bandwidth_mib: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if migration_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
    if bandwidth_mib is not None:
        if bandwidth_mib <= 0:
            raise InvalidConfig(f"bandwidth_mib must be positive, not {bandwidth_mib}")
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    return params


def _explain(exc: libvirt.libvirtError, uuid: str, dst: Hypervisor) -> HypervisorError:
    """Classify a failed migration (libvirt's same-host refusal has only its message to go by)."""
    err = classify(exc)
    message = err.message
    if err.code == libvirt.VIR_ERR_OPERATION_ABORTED:
        return MigrationAborted(
            f"migration of guest {uuid} was aborted: {message}", code=err.code, domain=err.domain
        )
    if "same host" in message:
        return SameHost(
            f"cannot migrate guest {uuid} to {dst.uri}: it is the same host: {message}",
            code=err.code,
            domain=err.domain,
        )
    if isinstance(err, NotFound) and err.code != libvirt.VIR_ERR_NO_DOMAIN:
        # A missing pool or volume on dst: the guest itself is fine, the destination is not.
        return InvalidConfig(
            f"cannot migrate guest {uuid} to {dst.uri}: {message}",
            code=err.code,
            domain=err.domain,
        )
    if err.code == libvirt.VIR_ERR_MIGRATE_UNSAFE:
        return UnsafeMigration(
            f"migrating guest {uuid} is unsafe (pass unsafe=True only for shared storage): "
            f"{message}",
            code=err.code,
            domain=err.domain,
        )
    return err


def migrate(
    src: Hypervisor,
    dst: Hypervisor,
    uuid: str,
    *,
    live: bool,
    migration_uri: str | None = None,
    copy_storage: bool = False,
    unsafe: bool = False,
    bandwidth_mib: int | None = None,
) -> DomainInfo:
    """Move the guest from src to dst and return its state there (persistent, gone from src).

    live=True: a running or paused guest keeps running (LIVE | PERSIST_DEST | UNDEFINE_SOURCE);
    migration_uri ('tcp://<address>:<port>') is where dst listens for the memory stream,
    chosen by dst when None (from its hostname: only right when that resolves to dst).
    live=False: a defined, stopped guest's config moves (OFFLINE | PERSIST_DEST |
    UNDEFINE_SOURCE); no data is sent. copy_storage copies the disks into same-named pools on
    dst (NON_SHARED_DISK; live only, never on shared storage: it would copy a disk onto
    itself). unsafe skips libvirt's disk cache-mode check (UNSAFE). bandwidth_mib caps the
    transfer in MiB/s.

    Raises WrongState for a guest in the wrong state for the mode, SameHost, UnsafeMigration,
    MigrationAborted, or the classified libvirt error; the guest then stays on src. After
    ConnectionLost nobody knows how far it got: read the guest on both hosts.
    """
    if copy_storage and not live:
        raise Unsupported("an offline migration moves no data: copy_storage needs live=True")
    flags = _flags(live=live, copy_storage=copy_storage, unsafe=unsafe)
    params = _params(migration_uri, bandwidth_mib)
    if src.uri == dst.uri or host_uuid(src) == host_uuid(dst):
        raise SameHost(f"cannot migrate guest {uuid}: {src.uri} and {dst.uri} are the same host")

    info = get_info(src, uuid)
    if not info.exists:
        raise NotFound(f"guest {uuid} is not on {src.uri}", code=libvirt.VIR_ERR_NO_DOMAIN)
    if live and not info.active:
        raise WrongState(
            f"cannot live-migrate guest {uuid} while it is {info.state}: start it first",
            state=info.state,
        )
    if not live and (info.active or not info.persistent):
        state = info.state if info.persistent else "transient"
        raise WrongState(
            f"cannot migrate guest {uuid} offline while it is {state}: "
            "it must be defined and stopped",
            state=info.state,
        )
    if not live and info.state is GuestState.SAVED:
        # The managed-save image stays behind on src; dst would boot afresh and lose it.
        raise WrongState(
            f"cannot migrate guest {uuid} offline with a saved state: start or discard it first",
            state=info.state,
        )
    pools = _volume_pools(get_xml(src, uuid))
    dst.call(lambda dconn: _refresh_pools(dconn, pools))
    _run_migration(src, dst, uuid, params, flags)
    moved = get_info(dst, uuid)
    if not moved.exists:
        raise NotFound(f"guest {uuid} is not on {dst.uri} after its migration")
    return moved
