"""Guest lifecycle calls: each takes a Hypervisor and a domain UUID and returns plain values.

Conventions:

- Lifecycle calls return the guest's ``DomainInfo`` as read right after the call.
- A guest libvirt does not know reads as ``DomainInfo.undefined(uuid)`` from ``get_info`` (a
  state, not an error: the portal's UNDEFINED); the other calls raise ``NotFound`` for it,
  except ``destroy``/``undefine``/``remove_managed_save``, which are idempotent and treat "gone"
  as done.
- Wrong state: on a failed call we re-read the guest's state rather than trust the error code
  (QEMU says OPERATION_INVALID, the test driver INTERNAL_ERROR). OPERATION_INVALID is always
  ``WrongState``; INTERNAL_ERROR / OPERATION_FAILED become ``WrongState`` only if the re-read
  state is one the operation cannot start from. ``WrongState.state`` carries that state.
- Retrying after a lost connection happens only for reads and for writes that are idempotent by
  construction (define, destroy, undefine, autostart, ...); a start/shutdown/save that may have
  taken effect is never sent twice: the caller re-reads and decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree

from .connection import Hypervisor
from .domxml import AGENT_CHANNEL
from .errors import (
    HypervisorError,
    InvalidConfig,
    NotFound,
    Unsupported,
    WrongState,
    classify,
)
from .types import (
    DomainInfo,
    GuestAddress,
    GuestState,
    NetworkView,
    guest_state,
    reason_name,
    state_name,
)

__all__ = [
    "agent_connected",
    "create_transient",
    "define",
    "destroy",
    "find_by_metadata",
    "find_by_name",
    "get_info",
    "get_xml",
    "has_managed_save",
    "job_stats",
    "list_domains",
    "make_persistent",
    "managed_save",
    "network_view",
    "reboot",
    "remove_managed_save",
    "restore",
    "resume",
    "save",
    "set_autostart",
    "shutdown",
    "start",
    "suspend",
    "undefine",
    "wait_for",
    "wait_for_stop",
]

_STOPPED = frozenset({GuestState.DEFINED, GuestState.SAVED})
_ACTIVE = frozenset({GuestState.RUNNING, GuestState.PAUSED})


def _flag(name: str) -> int:
    """A libvirt flag by name, 0 where this libvirt-python lacks it."""
    value = getattr(libvirt, name, 0)
    return value if isinstance(value, int) else 0


# Tried in order until the driver accepts one (the test driver refuses NVRAM, for one).
_UNDEFINE_FLAG_SETS: tuple[int, ...] = (
    _flag("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE")
    | _flag("VIR_DOMAIN_UNDEFINE_NVRAM")
    | _flag("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"),
    _flag("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE") | _flag("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"),
    _flag("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE"),
    0,
)


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _xml_uuid(xml: str) -> str | None:
    """The <uuid> of a domain document, lower-cased, or None."""
    try:
        root = etree.fromstring(xml.encode(), _parser())
    except etree.XMLSyntaxError as exc:
        raise InvalidConfig(f"domain XML does not parse: {exc}") from exc
    text = root.findtext("uuid")
    return text.strip().lower() if text else None


def read_info(dom: libvirt.virDomain) -> DomainInfo:
    """DomainInfo from a domain handle, with cheap getters only (no XML parse)."""
    state, reason = dom.state()
    _state, max_mem, _mem, vcpus, _cpu_time = dom.info()
    persistent = bool(dom.isPersistent())
    managed = bool(dom.hasManagedSaveImage(0)) if persistent else False
    autostart = bool(dom.autostart()) if persistent else False
    dom_id = dom.ID()
    return DomainInfo(
        uuid=dom.UUIDString(),
        name=dom.name(),
        state=guest_state(state, reason, has_managed_save=managed),
        reason=reason_name(state, reason),
        libvirt_state=state_name(state),
        persistent=persistent,
        autostart=autostart,
        has_managed_save=managed,
        id=dom_id if dom_id >= 0 else None,
        vcpus=int(vcpus),
        memory_kib=int(max_mem),
    )


def _info_or_undefined(dom: libvirt.virDomain, uuid: str) -> DomainInfo:
    """read_info, or UNDEFINED when the guest vanished (a transient guest that stopped)."""
    try:
        return read_info(dom)
    except libvirt.libvirtError as exc:
        err = classify(exc)
        if isinstance(err, NotFound):
            return DomainInfo.undefined(uuid)
        raise err from exc


def _explain(
    exc: libvirt.libvirtError,
    dom: libvirt.virDomain,
    uuid: str,
    op: str,
    allowed: frozenset[GuestState],
) -> HypervisorError:
    """Classify a failed call, re-reading the guest's state to recognise a wrong state."""
    err = classify(exc)
    maybe_state = type(err) is HypervisorError and err.code in (
        libvirt.VIR_ERR_INTERNAL_ERROR,
        libvirt.VIR_ERR_OPERATION_FAILED,
    )
    if not (isinstance(err, WrongState) or maybe_state):
        return err
    try:
        current = read_info(dom)
    except libvirt.libvirtError as read_exc:
        read_err = classify(read_exc)
        return read_err if isinstance(read_err, NotFound) else err
    if isinstance(err, WrongState) or current.state not in allowed:
        return WrongState(
            f"cannot {op} guest {uuid} while it is {current.state} ({current.reason}): "
            f"{err.message}",
            code=err.code,
            domain=err.domain,
            state=current.state,
        )
    return err


def _act(
    hv: Hypervisor,
    uuid: str,
    op: str,
    action: Callable[[libvirt.virDomain], object],
    *,
    allowed: frozenset[GuestState],
    idempotent: bool = False,
) -> DomainInfo:
    """Look the guest up, run action on it, explain failures, return its state afterwards."""

    def run(conn: libvirt.virConnect) -> DomainInfo:
        dom = conn.lookupByUUIDString(uuid)
        try:
            action(dom)
        except libvirt.libvirtError as exc:
            raise _explain(exc, dom, uuid, op, allowed) from exc
        return _info_or_undefined(dom, uuid)

    return hv.call(run, idempotent=idempotent)


def _lookup_or_none(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    """The domain with this UUID, or None when libvirt does not know it (other errors raise)."""
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        err = classify(exc)
        if isinstance(err, NotFound):
            return None
        raise err from exc


# --- reads -------------------------------------------------------------------------------


def get_info(hv: Hypervisor, uuid: str) -> DomainInfo:
    """The guest's current state; UNDEFINED (not an exception) when libvirt does not know it."""

    def read(conn: libvirt.virConnect) -> DomainInfo:
        dom = _lookup_or_none(conn, uuid)
        return DomainInfo.undefined(uuid) if dom is None else _info_or_undefined(dom, uuid)

    return hv.call(read)


def find_by_name(hv: Hypervisor, name: str) -> DomainInfo | None:
    """The guest called name, or None."""

    def read(conn: libvirt.virConnect) -> DomainInfo | None:
        try:
            return read_info(conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            err = classify(exc)
            if isinstance(err, NotFound):
                return None
            raise err from exc

    return hv.call(read)


def list_domains(hv: Hypervisor) -> list[DomainInfo]:
    """Every guest on the host, active and inactive, from one listAllDomains call."""

    def read(conn: libvirt.virConnect) -> list[DomainInfo]:
        infos = []
        for dom in conn.listAllDomains(0):
            try:
                infos.append(read_info(dom))
            except libvirt.libvirtError as exc:
                err = classify(exc)
                if not isinstance(err, NotFound):  # vanished since the listing: skip it
                    raise err from exc
        return infos

    return hv.call(read)


def get_xml(hv: Hypervisor, uuid: str, *, inactive: bool = False) -> str:
    """The guest's live XML, or with inactive=True the config it boots with next."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return hv.call(lambda conn: conn.lookupByUUIDString(uuid).XMLDesc(flags))


def has_managed_save(hv: Hypervisor, uuid: str) -> bool:
    """True if the guest has a managed-save image (False for an unknown guest)."""
    return get_info(hv, uuid).has_managed_save


def _metadata_matches(text: str, key: str, value: str) -> bool:
    """True if the metadata element has attribute key=value or a descendant <key>value</key>."""
    try:
        root = etree.fromstring(text.encode(), _parser())
    except etree.XMLSyntaxError:
        return False
    if root.get(key) == value:
        return True
    for node in root.iter():
        is_key = isinstance(node.tag, str) and etree.QName(node).localname == key
        if is_key and (node.text or "").strip() == value:
            return True
    return False


def find_by_metadata(hv: Hypervisor, ns: str, key: str, value: str) -> list[DomainInfo]:
    """Guests whose metadata element in namespace ns holds key=value (e.g. a request id)."""

    def search(conn: libvirt.virConnect) -> list[DomainInfo]:
        found = []
        for dom in conn.listAllDomains(0):
            try:
                text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, 0)
                if _metadata_matches(text, key, value):
                    found.append(read_info(dom))
            except libvirt.libvirtError as exc:
                err = classify(exc)
                # No metadata in ns, or the guest vanished since the listing.
                if not isinstance(err, NotFound):
                    raise err from exc
        return found

    return hv.call(search)


def job_stats(hv: Hypervisor, uuid: str) -> dict[str, Any]:
    """Progress of the guest's current job (migration, save); Unsupported on the test driver."""
    return hv.call(lambda conn: dict(conn.lookupByUUIDString(uuid).jobStats(0)))


def wait_for(
    hv: Hypervisor,
    uuid: str,
    done: Callable[[DomainInfo], bool],
    timeout: float,
    *,
    interval: float = 0.25,
) -> DomainInfo:
    """Poll the guest until done(info) or the deadline; returns the last info either way."""
    deadline = time.monotonic() + timeout
    while True:
        info = get_info(hv, uuid)
        remaining = deadline - time.monotonic()
        if done(info) or remaining <= 0:
            return info
        time.sleep(min(interval, remaining))


def wait_for_stop(hv: Hypervisor, uuid: str, timeout: float) -> DomainInfo:
    """Wait until the guest is no longer running or paused; check .active on the result.

    A transient guest that stopped reads as UNDEFINED: libvirt forgets it, and its reason
    with it (the STOPPED event carries the reason).
    """
    return wait_for(hv, uuid, lambda info: not info.active, timeout)


# --- creating and defining -------------------------------------------------------------


def create_transient(
    hv: Hypervisor,
    xml: str,
    *,
    paused: bool = False,
    autodestroy: bool = False,
    validate: bool = True,
) -> DomainInfo:
    """Start a guest from XML without defining it; autodestroy ties it to hv's connection."""
    flags = 0
    if paused:
        flags |= libvirt.VIR_DOMAIN_START_PAUSED
    if autodestroy:
        flags |= libvirt.VIR_DOMAIN_START_AUTODESTROY
    if validate:
        flags |= libvirt.VIR_DOMAIN_START_VALIDATE
    # Not retried: after a lost connection the guest may already run; look it up by UUID.
    return hv.call(lambda conn: read_info(conn.createXML(xml, flags)), idempotent=False)


def define(hv: Hypervisor, xml: str, *, validate: bool = True) -> DomainInfo:
    """Define (or redefine) a persistent guest, validating the XML against libvirt's schema.

    The schema check costs libvirtd about fifteen times the define itself; a caller that has
    had documents of the same shape validated may pass validate=False (libvirt still parses
    and refuses what it cannot use).
    """
    flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE if validate else 0
    return hv.call(lambda conn: read_info(conn.defineXMLFlags(xml, flags)))


def make_persistent(hv: Hypervisor, uuid: str, xml: str) -> DomainInfo:
    """Give a running transient guest a persistent config (used from its next boot on)."""
    xml_uuid = _xml_uuid(xml)
    if xml_uuid != uuid.lower():
        raise InvalidConfig(f"XML is for guest {xml_uuid}, not {uuid}")

    def run(conn: libvirt.virConnect) -> DomainInfo:
        conn.lookupByUUIDString(uuid)  # refuse to create a new guest if this one is gone
        flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE
        return read_info(conn.defineXMLFlags(xml, flags))

    return hv.call(run)


def undefine(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Remove the guest's persistent config (with managed save, NVRAM, snapshot metadata).

    Idempotent: an unknown or transient guest is left as it is. A running guest keeps running
    as a transient one; destroy it first to remove it completely.
    """

    def run(conn: libvirt.virConnect) -> DomainInfo:
        dom = _lookup_or_none(conn, uuid)
        if dom is None:
            return DomainInfo.undefined(uuid)
        try:
            if not dom.isPersistent():
                return read_info(dom)
        except libvirt.libvirtError as exc:
            err = classify(exc)
            if isinstance(err, NotFound):
                return DomainInfo.undefined(uuid)
            raise err from exc
        for flags in _UNDEFINE_FLAG_SETS:
            try:
                dom.undefineFlags(flags)
                break
            except libvirt.libvirtError as exc:
                err = classify(exc)
                if isinstance(err, NotFound):
                    return DomainInfo.undefined(uuid)
                if not isinstance(err, Unsupported):
                    raise err from exc
                if flags == 0:
                    dom.undefine()  # a driver without undefineFlags at all
                    break
        return _info_or_undefined(dom, uuid)

    return hv.call(run)


# --- lifecycle -------------------------------------------------------------------------


def start(
    hv: Hypervisor, uuid: str, *, paused: bool = False, force_boot: bool = False
) -> DomainInfo:
    """Boot a defined guest (restoring its managed save unless force_boot)."""
    flags = 0
    if paused:
        flags |= libvirt.VIR_DOMAIN_START_PAUSED
    if force_boot:
        flags |= libvirt.VIR_DOMAIN_START_FORCE_BOOT
    return _act(hv, uuid, "start", lambda dom: dom.createWithFlags(flags), allowed=_STOPPED)


def shutdown(hv: Hypervisor, uuid: str, *, agent: bool = False) -> DomainInfo:
    """Ask the guest to power off, through its guest agent with agent=True, else by ACPI;
    returns at once. See wait_for_stop. An agent that does not answer raises Busy."""
    if agent:
        flag = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
        return _act(hv, uuid, "shut down", lambda dom: dom.shutdownFlags(flag), allowed=_ACTIVE)
    return _act(hv, uuid, "shut down", lambda dom: dom.shutdown(), allowed=_ACTIVE)


# Where addresses come from, in the order they are trusted: a lease the host handed out, what
# the guest itself says, what the host saw on the wire.
ADDRESS_SOURCES = (
    ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
    ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
)


def network_view(hv: Hypervisor, uuid: str) -> NetworkView:
    """The running guest's addresses from every source that answers, its agent's state and its
    NIC count, in one round of calls (nothing for a stopped or unknown guest).

    Each address appears once, under the first source that knows it; loopback and link-local
    addresses are left out. A source that cannot answer (no agent, no lease) adds nothing. A
    guest with no NIC is not asked for addresses at all.
    """

    def run(conn: libvirt.virConnect) -> NetworkView:
        dom = _lookup_or_none(conn, uuid)
        if dom is None or not dom.isActive():
            return NetworkView()
        root = etree.fromstring(dom.XMLDesc(0).encode(), _parser())
        nics = len(root.findall("devices/interface"))
        found: dict[str, GuestAddress] = {}
        for source, flag in ADDRESS_SOURCES if nics else ():
            try:
                interfaces = dom.interfaceAddresses(flag, 0) or {}
            except libvirt.libvirtError:
                continue  # this source knows nothing now (no agent, no ARP entry, no network)
            for _name, nic in sorted(interfaces.items()):
                mac = str(nic.get("hwaddr") or "").lower()
                for addr in nic.get("addrs") or ():
                    ip = str(addr.get("addr", ""))
                    if not ip or ip in found or _local_address(ip):
                        continue
                    v6 = addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV6
                    found[ip] = GuestAddress(
                        ip=ip,
                        prefix=int(addr.get("prefix") or 0),
                        mac=mac,
                        family="ipv6" if v6 else "ipv4",
                        source=source,
                    )
        return NetworkView(tuple(found.values()), _agent_in(root), nics)

    return hv.call(run)


def _local_address(ip: str) -> bool:
    return ip.startswith(("127.", "169.254.", "fe80:")) or ip == "::1"


def agent_connected(hv: Hypervisor, uuid: str) -> bool:
    """Whether the guest agent is connected now (libvirt says so in the live XML's channel)."""
    try:
        xml = get_xml(hv, uuid)
    except NotFound:
        return False
    return _agent_in(etree.fromstring(xml.encode(), _parser()))


def _agent_in(root: etree._Element) -> bool:
    """Whether a live domain XML shows the guest agent's channel connected."""
    target = root.find(f"devices/channel/target[@name='{AGENT_CHANNEL}']")
    return target is not None and target.get("state") == "connected"


def destroy(hv: Hypervisor, uuid: str, *, graceful: bool = False) -> DomainInfo:
    """Power the guest off at once. Idempotent: an unknown or shut off guest is done."""
    flags = libvirt.VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0

    def run(conn: libvirt.virConnect) -> DomainInfo:
        dom = _lookup_or_none(conn, uuid)
        if dom is None:
            return DomainInfo.undefined(uuid)
        try:
            if flags:
                dom.destroyFlags(flags)
            else:
                dom.destroy()
        except libvirt.libvirtError as exc:
            err = classify(exc)
            if isinstance(err, NotFound):
                return DomainInfo.undefined(uuid)
            info = _info_or_undefined(dom, uuid)
            if not info.active:
                return info
            raise err from exc
        return _info_or_undefined(dom, uuid)

    return hv.call(run)


def reboot(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Ask the guest to reboot (its <on_reboot> decides what happens)."""
    return _act(
        hv, uuid, "reboot", lambda dom: dom.reboot(0), allowed=frozenset({GuestState.RUNNING})
    )


def suspend(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Pause the guest's CPUs."""
    return _act(
        hv, uuid, "suspend", lambda dom: dom.suspend(), allowed=frozenset({GuestState.RUNNING})
    )


def resume(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Let a paused guest run again."""
    return _act(
        hv, uuid, "resume", lambda dom: dom.resume(), allowed=frozenset({GuestState.PAUSED})
    )


def save(hv: Hypervisor, uuid: str, path: str) -> DomainInfo:
    """Save the guest's memory to a file on the host and stop it."""
    return _act(hv, uuid, "save", lambda dom: dom.save(path), allowed=_ACTIVE)


def restore(hv: Hypervisor, path: str, *, paused: bool = False) -> DomainInfo:
    """Start a guest again from a file written by save."""
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0

    def run(conn: libvirt.virConnect) -> DomainInfo:
        uuid = _xml_uuid(conn.saveImageGetXMLDesc(path, 0))
        if flags:
            conn.restoreFlags(path, None, flags)
        else:
            conn.restore(path)
        if uuid is None:
            raise InvalidConfig(f"saved image {path} names no guest UUID")
        return _info_or_undefined(conn.lookupByUUIDString(uuid), uuid)

    return hv.call(run, idempotent=False)


def managed_save(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Save the guest into libvirt's own image and stop it; the next start restores it."""
    return _act(hv, uuid, "managed-save", lambda dom: dom.managedSave(0), allowed=_ACTIVE)


def remove_managed_save(hv: Hypervisor, uuid: str) -> DomainInfo:
    """Drop the guest's managed-save image so the next start boots afresh. Idempotent."""

    def run(dom: libvirt.virDomain) -> None:
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)

    return _act(hv, uuid, "remove the managed save of", run, allowed=_STOPPED, idempotent=True)


def set_autostart(hv: Hypervisor, uuid: str, on: bool) -> DomainInfo:
    """Start the guest (or not) when libvirtd starts; persistent guests only."""
    return _act(
        hv,
        uuid,
        "set autostart on",
        lambda dom: dom.setAutostart(1 if on else 0),
        allowed=frozenset(GuestState) - {GuestState.UNDEFINED},
        idempotent=True,
    )
