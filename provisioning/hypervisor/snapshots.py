"""Internal snapshots of a guest: take, list, revert, delete (libvirt's snapshot API).

Internal snapshots live inside the guest's qcow2 disks (and, for a running guest, its memory
state inside the first of them), so they need no files of their own and go when the disks go.
A running or paused guest's snapshot holds its memory too, and reverting to it brings the
guest back running or paused where it was; a stopped guest's holds its disks only. Snapshots
are created with VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC: either libvirt has the whole snapshot
afterwards or nothing of it.
"""

from __future__ import annotations

import dataclasses

import libvirt
from lxml import etree

from .connection import Hypervisor
from .domxml import parse_untrusted
from .errors import AlreadyExists, InvalidConfig, NotFound, Unsupported, classify
from .operations import _lookup_or_none, read_info
from .types import DomainInfo


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    created: int  # Unix time libvirt recorded
    state: str  # the guest's state when taken: running, paused, shutoff, ...
    memory: bool  # holds the guest's memory (taken while it ran)
    description: str
    parent: str | None
    current: bool


def snapshot_xml(name: str, description: str = "", *, memory: bool) -> str:
    """The <domainsnapshot> for an internal snapshot, with or without the guest's memory."""
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = name
    if description:
        etree.SubElement(root, "description").text = description
    if memory:
        etree.SubElement(root, "memory", snapshot="internal")
    return etree.tostring(root, encoding="unicode")


def cannot_snapshot(domain_xml: str) -> str | None:
    """Why this domain's disks cannot hold internal snapshots, or None when they can.

    Every writable disk must be qcow2: raw disks have nowhere to keep one, and libvirt would
    refuse (or, for a mix, take a snapshot that cannot be reverted whole).
    """
    root = parse_untrusted(domain_xml)
    if root.get("type") == "test":
        return None  # libvirt's test driver keeps snapshots of any disk
    for disk in root.iterfind("devices/disk"):
        if disk.find("readonly") is not None or disk.get("device") in ("cdrom", "floppy"):
            continue
        target = disk.find("target")
        name = target.get("dev") if target is not None else "?"
        driver = disk.find("driver")
        kind = driver.get("type") if driver is not None else None
        if kind != "qcow2":
            what = kind or "of an unknown format"
            return f"its disk {name} is {what}, and only qcow2 disks hold snapshots"
    return None


def _read(snap: libvirt.virDomainSnapshot, current: str | None) -> SnapshotInfo:
    root = etree.fromstring(snap.getXMLDesc(0).encode())
    memory = root.find("memory")
    state = root.findtext("state") or ""
    return SnapshotInfo(
        name=snap.getName(),
        created=int(root.findtext("creationTime") or 0),
        state=state,
        # Older drivers leave <memory> out; a snapshot of a running guest holds its memory then.
        memory=(memory.get("snapshot") == "internal")
        if memory is not None
        else state in ("running", "paused"),
        description=root.findtext("description") or "",
        parent=root.findtext("parent/name"),
        current=snap.getName() == current,
    )


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    dom = _lookup_or_none(conn, uuid)
    if dom is None:
        raise NotFound(f"no domain {uuid}")
    return dom


def _current(dom: libvirt.virDomain) -> str | None:
    try:
        return str(dom.snapshotCurrent(0).getName()) if dom.hasCurrentSnapshot(0) else None
    except libvirt.libvirtError:
        return None


def list_snapshots(hv: Hypervisor, uuid: str) -> list[SnapshotInfo]:
    """The guest's snapshots, oldest first (NotFound for an unknown guest)."""

    def run(conn: libvirt.virConnect) -> list[SnapshotInfo]:
        dom = _domain(conn, uuid)
        current = _current(dom)
        found = [_read(s, current) for s in dom.listAllSnapshots(0)]
        return sorted(found, key=lambda s: (s.created, s.name))

    return hv.call(run)


def create_snapshot(hv: Hypervisor, uuid: str, name: str, description: str = "") -> SnapshotInfo:
    """Take an internal snapshot now: with memory when the guest runs or is paused.

    Not retried after a lost connection: the caller lists the snapshots and decides.
    """

    def run(conn: libvirt.virConnect) -> SnapshotInfo:
        dom = _domain(conn, uuid)
        reason = cannot_snapshot(dom.XMLDesc(0))
        if reason is not None:
            raise InvalidConfig(reason)
        xml = snapshot_xml(name, description, memory=bool(dom.isActive()))
        try:
            snap = dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        except libvirt.libvirtError as exc:
            if "already exists" in str(exc):
                raise AlreadyExists(f"a snapshot {name!r} exists already") from exc
            raise
        return _read(snap, _current(dom))

    return hv.call(run, idempotent=False)


def revert_snapshot(hv: Hypervisor, uuid: str, name: str) -> DomainInfo:
    """Return the guest to the snapshot: its disks, and its memory and state if it has them."""

    def run(conn: libvirt.virConnect) -> DomainInfo:
        dom = _domain(conn, uuid)
        snap = dom.snapshotLookupByName(name, 0)  # NotFound when it is not there
        dom.revertToSnapshot(snap, 0)
        return read_info(dom)

    return hv.call(run, idempotent=False)


def delete_snapshot(hv: Hypervisor, uuid: str, name: str) -> None:
    """Delete one snapshot (its children stay). Idempotent: a snapshot already gone is done."""

    def run(conn: libvirt.virConnect) -> None:
        dom = _lookup_or_none(conn, uuid)
        if dom is None:
            return
        try:
            snap = dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if isinstance(classify(exc), NotFound):
                return
            raise
        snap.delete(0)

    hv.call(run)


def delete_all_metadata(hv: Hypervisor, uuid: str) -> int:
    """Forget every snapshot of the guest in libvirt, leaving its disks as they are (they are
    about to go: a rebuild makes them anew, a delete removes them); how many. Idempotent."""

    def run(conn: libvirt.virConnect) -> int:
        dom = _lookup_or_none(conn, uuid)
        if dom is None:
            return 0
        snaps = dom.listAllSnapshots(0)
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
        for snap in snaps:
            try:
                snap.delete(flags)
            except libvirt.libvirtError as exc:
                err = classify(exc)
                if isinstance(err, Unsupported) and flags:
                    flags = 0  # the test driver: its snapshots are metadata anyway
                    snap.delete(flags)
                elif not isinstance(err, NotFound):
                    raise
        return len(snaps)

    return hv.call(run)
