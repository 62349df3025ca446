"""Libvirt domain XML for portal guests, built with lxml per provisioning method and phase.

Pure module: stdlib + lxml only. Markup is only ever produced by lxml element builders, so no
caller-supplied text can become markup.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from lxml import etree

__all__ = [
    "AGENT_CHANNEL",
    "METADATA_NS",
    "METADATA_PREFIX",
    "ONE_PHASE_METHODS",
    "BootMedia",
    "DiskSpec",
    "GuestSpec",
    "Method",
    "NicSpec",
    "Phase",
    "SpecError",
    "VolumeRef",
    "build_xml",
    "final_xml",
    "install_xml",
    "parse_untrusted",
    "pretty",
    "random_mac",
    "read_metadata",
]

Method = Literal["cdrom", "pxe", "kernel", "import", "cloud"]
# Methods that run no installer: the guest boots its final config straight away.
ONE_PHASE_METHODS = ("import", "cloud")
Phase = Literal["install", "final"]

METADATA_NS = "https://vmportal.dev/xmlns/guest/1"
METADATA_PREFIX = "vmportal"

# Device kinds an admin may add through extra_devices. Disks, filesystems, hostdevs and
# interfaces are left out on purpose: they are how host paths and host hardware get in.
ALLOWED_EXTRA_DEVICES = frozenset(
    {
        "rng",
        "watchdog",
        "sound",
        "video",
        "input",
        "channel",
        "serial",
        "console",
        "controller",
        "memballoon",
        "tpm",
        "redirdev",
        "hub",
        "panic",
    }
)
# Attributes that name host files or sockets; allowed device kinds can still carry them
# (serial type='file', tpm passthrough, channel sockets), so they are refused anywhere inside.
_HOST_PATH_ATTRIBUTES = frozenset({"path", "file", "dir", "socket"})
_RNG_RANDOM_BACKENDS = frozenset({"/dev/urandom", "/dev/random", "/dev/hwrng"})
MAX_EXTRA_DEVICES_CHARS = 65536

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
# An ASCII subset of XML NCName: safe as an element local name everywhere.
_NCNAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,63}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TARGET_RE = re.compile(r"(?:vd|sd|hd|xvd)[a-z]{1,2}")
_DTD_RE = re.compile(r"<!\s*(?:DOCTYPE|ENTITY|ATTLIST|ELEMENT|NOTATION)", re.IGNORECASE)

MEMORY_MIB_MIN = 16
MEMORY_MIB_MAX = 1048576
VCPUS_MAX = 256
CMDLINE_MAX = 2048
PATH_MAX = 4096
DOMAIN_TYPES = ("kvm", "qemu")
DISK_BUSES = ("virtio", "sata", "scsi", "ide", "usb")
DISK_FORMATS = ("qcow2", "raw")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
GRAPHICS_LISTEN = "127.0.0.1"
AGENT_CHANNEL = "org.qemu.guest_agent.0"


class SpecError(ValueError):
    """A guest description that cannot become a safe libvirt domain; the message names the field."""


@dataclass(frozen=True)
class VolumeRef:
    """A volume in a libvirt storage pool."""

    pool: str
    volume: str


@dataclass(frozen=True)
class DiskSpec:
    """A guest disk backed by a storage-pool volume."""

    source: VolumeRef
    target: str = "vda"
    bus: str = "virtio"
    format: str = "qcow2"


@dataclass(frozen=True)
class NicSpec:
    """A guest NIC on a libvirt network, a host bridge, or (neither) user-mode networking."""

    mac: str
    network: str | None = None
    bridge: str | None = None
    model: str = "virtio"


@dataclass(frozen=True)
class BootMedia:
    """Install media registered by admins; host paths are allowed here because admins chose them."""

    iso: VolumeRef | str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to render a guest's install-phase and final domain XML."""

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    method: Method
    domain_type: str = "qemu"
    arch: str = "x86_64"
    machine: str | None = None
    emulator: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    media: BootMedia = BootMedia()
    # How the installed (or only) config boots: BIOS from the disk, a host bootloader, or the
    # media's kernel and initrd on every boot (a kernel-method guest with no install).
    final_boot: Literal["hd", "bootloader", "kernel"] = "hd"
    bootloader: str | None = None
    serial_log: str | None = None
    vnc: bool = True
    # Where the VNC display listens: the host's loopback unless an admin gave another address.
    vnc_listen: str = GRAPHICS_LISTEN
    metadata: Mapping[str, str] = field(default_factory=dict)
    extra_devices: str | None = None
    # A cloud-init NoCloud seed (an ISO volume labelled cidata), attached as a CD-ROM.
    seed: VolumeRef | None = None
    # The QEMU guest agent's virtio channel (org.qemu.guest_agent.0).
    agent: bool = False
    # An answer file on a CD-ROM labelled OEMDRV, attached for the install phase only.
    answer_disk: VolumeRef | None = None


# --------------------------------------------------------------------------- validation


def _is_xml_char(ch: str) -> bool:
    """True when ch may appear in an XML 1.0 document (the Char production)."""
    code = ord(ch)
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )


def _require_str(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{field_name}: must be a string, got {type(value).__name__}")
    return value


def _require_int(value: object, field_name: str, low: int, high: int) -> int:
    # bool is an int subclass; True vCPUs is a bug, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{field_name}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise SpecError(f"{field_name}: must be between {low} and {high}, got {value}")
    return value


def _require_match(value: object, pattern: re.Pattern[str], field_name: str, what: str) -> str:
    text = _require_str(value, field_name)
    if not pattern.fullmatch(text):
        raise SpecError(f"{field_name}: {what}, got {text[:80]!r}")
    return text


def _require_choice(value: object, choices: Iterable[str], field_name: str) -> str:
    allowed = tuple(choices)
    if value not in allowed:
        raise SpecError(f"{field_name}: must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _require_host_path(value: object, field_name: str) -> str:
    path = _require_str(value, field_name)
    if not path.startswith("/"):
        raise SpecError(f"{field_name}: must be an absolute host path, got {path!r}")
    if len(path) > PATH_MAX:
        raise SpecError(f"{field_name}: longer than {PATH_MAX} characters")
    if not path.isprintable():
        raise SpecError(f"{field_name}: contains control or unprintable characters")
    return path


def _require_libvirt_name(value: object, field_name: str) -> str:
    """Pool, volume, network and bridge names: one path component of printable characters."""
    name = _require_str(value, field_name)
    if not name or len(name) > 255:
        raise SpecError(f"{field_name}: must be 1 to 255 characters")
    if "/" in name or name in (".", "..") or not name.isprintable():
        raise SpecError(f"{field_name}: must be a plain name without '/' or control characters")
    return name


def _check_volume(ref: object, field_name: str) -> VolumeRef:
    if not isinstance(ref, VolumeRef):
        raise SpecError(f"{field_name}: must be a VolumeRef")
    _require_libvirt_name(ref.pool, f"{field_name}.pool")
    _require_libvirt_name(ref.volume, f"{field_name}.volume")
    return ref


def _check_mac(value: object, field_name: str) -> str:
    mac = _require_match(value, _MAC_RE, field_name, "must look like 52:54:00:12:34:56").lower()
    first_octet = int(mac[:2], 16)
    if first_octet & 1:
        raise SpecError(f"{field_name}: must be a unicast address (first octet even), got {mac}")
    if mac == "00:00:00:00:00:00":
        raise SpecError(f"{field_name}: the all-zero address is not a usable MAC")
    return mac


def _check_cmdline(value: object) -> str:
    cmdline = _require_str(value, "media.cmdline")
    if len(cmdline) > CMDLINE_MAX:
        raise SpecError(f"media.cmdline: longer than {CMDLINE_MAX} characters")
    bad = [ch for ch in cmdline if not 0x20 <= ord(ch) <= 0x7E]
    if bad:
        raise SpecError(f"media.cmdline: only printable ASCII is allowed, found {bad[0]!r}")
    return cmdline


def _check_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise SpecError("metadata: must be a mapping of str to str")
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        _require_match(key, _NCNAME_RE, "metadata key", "must be an XML name like 'request_id'")
        if key.lower().startswith("xml"):
            raise SpecError(f"metadata key: names starting with 'xml' are reserved, got {key!r}")
        text = _require_str(value, f"metadata[{key!r}]")
        bad = next((ch for ch in text if not _is_xml_char(ch)), None)
        if bad is not None:
            raise SpecError(f"metadata[{key!r}]: character {bad!r} cannot be stored in XML")
        checked[key] = text
    return checked


def _validate(spec: GuestSpec) -> None:
    """Raise SpecError for the first thing in spec that cannot become a domain."""
    if not isinstance(spec, GuestSpec):
        raise SpecError("spec: must be a GuestSpec")
    _require_match(
        spec.name, _NAME_RE, "name", "must be 1-63 of A-Z a-z 0-9 . _ - (no leading punctuation)"
    )
    uuid_text = _require_match(
        spec.uuid, _UUID_RE, "uuid", "must be a UUID like 8-4-4-4-12 hex digits"
    )
    if uuidlib.UUID(uuid_text).int == 0:
        raise SpecError("uuid: the nil UUID is not allowed")
    _require_int(spec.memory_mib, "memory_mib", MEMORY_MIB_MIN, MEMORY_MIB_MAX)
    _require_int(spec.vcpus, "vcpus", 1, VCPUS_MAX)
    _require_choice(spec.method, get_args(Method), "method")
    _require_choice(spec.domain_type, DOMAIN_TYPES, "domain_type")
    _require_match(spec.arch, _TOKEN_RE, "arch", "must be a plain architecture name")
    if spec.machine is not None:
        _require_match(spec.machine, _TOKEN_RE, "machine", "must be a plain machine type name")
    if spec.emulator is not None:
        _require_host_path(spec.emulator, "emulator")
    if spec.serial_log is not None:
        _require_host_path(spec.serial_log, "serial_log")
    if not isinstance(spec.vnc, bool):
        raise SpecError("vnc: must be a bool")
    try:
        ipaddress.ip_address(spec.vnc_listen)
    except ValueError:
        raise SpecError("vnc_listen: must be an IP address") from None
    if not isinstance(spec.agent, bool):
        raise SpecError("agent: must be a bool")
    if spec.seed is not None:
        _check_volume(spec.seed, "seed")
    if spec.answer_disk is not None:
        _check_volume(spec.answer_disk, "answer_disk")

    targets: set[str] = set()
    for index, disk in enumerate(spec.disks):
        where = f"disks[{index}]"
        if not isinstance(disk, DiskSpec):
            raise SpecError(f"{where}: must be a DiskSpec")
        _check_volume(disk.source, f"{where}.source")
        target = _require_match(disk.target, _TARGET_RE, f"{where}.target", "must look like vda")
        if target in targets:
            raise SpecError(f"{where}.target: {target} is used by another disk")
        targets.add(target)
        _require_choice(disk.bus, DISK_BUSES, f"{where}.bus")
        _require_choice(disk.format, DISK_FORMATS, f"{where}.format")

    macs: set[str] = set()
    for index, nic in enumerate(spec.nics):
        where = f"nics[{index}]"
        if not isinstance(nic, NicSpec):
            raise SpecError(f"{where}: must be a NicSpec")
        mac = _check_mac(nic.mac, f"{where}.mac")
        if mac in macs:
            raise SpecError(f"{where}.mac: {mac} is used by another NIC")
        macs.add(mac)
        if nic.network is not None and nic.bridge is not None:
            raise SpecError(f"{where}: set at most one of network or bridge")
        if nic.network is not None:
            _require_libvirt_name(nic.network, f"{where}.network")
        if nic.bridge is not None:
            _require_libvirt_name(nic.bridge, f"{where}.bridge")
        _require_choice(nic.model, NIC_MODELS, f"{where}.model")

    media = spec.media
    if not isinstance(media, BootMedia):
        raise SpecError("media: must be a BootMedia")
    if media.iso is not None:
        if isinstance(media.iso, VolumeRef):
            _check_volume(media.iso, "media.iso")
        else:
            _require_host_path(media.iso, "media.iso")
    if media.kernel is not None:
        _require_host_path(media.kernel, "media.kernel")
    if media.initrd is not None:
        _require_host_path(media.initrd, "media.initrd")
    _check_cmdline(media.cmdline)

    if spec.method == "cdrom" and media.iso is None:
        raise SpecError("media.iso: the cdrom method needs an ISO")
    if spec.method == "pxe" and not spec.nics:
        raise SpecError("nics: the pxe method needs at least one NIC")
    if spec.method == "kernel":
        if media.kernel is None:
            raise SpecError("media.kernel: the kernel method needs a kernel path")
        if media.initrd is None:
            raise SpecError("media.initrd: the kernel method needs an initrd path")
    if spec.method == "cloud" and spec.seed is None:
        raise SpecError("seed: the cloud method needs a cloud-init seed volume")
    if spec.method == "cloud" and (media.kernel is None) != (media.initrd is None):
        raise SpecError("media: a cloud image boots a kernel and an initrd together, or neither")

    _require_choice(spec.final_boot, ("hd", "bootloader", "kernel"), "final_boot")
    if spec.final_boot == "kernel" and (media.kernel is None or media.initrd is None):
        raise SpecError("media: final_boot='kernel' needs a kernel and an initrd")
    if spec.final_boot == "bootloader":
        if spec.bootloader is None:
            raise SpecError("bootloader: final_boot='bootloader' needs a bootloader path")
        _require_host_path(spec.bootloader, "bootloader")
    elif spec.bootloader is not None:
        _require_host_path(spec.bootloader, "bootloader")

    _check_metadata(spec.metadata)
    if spec.extra_devices is not None:
        _parse_extra_devices(spec.extra_devices)


# --------------------------------------------------------------------------- untrusted XML


def _safe_parser() -> etree.XMLParser:
    # No entity expansion (XXE, billion laughs), no DTD loading, no network, default size limits.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        remove_comments=True,
        remove_pis=True,
    )


def _refuse_dtd_text(text: str, field_name: str) -> None:
    # Checked on the text too, so the message is clear rather than a parser's syntax error.
    if _DTD_RE.search(text):
        raise SpecError(f"{field_name}: DTD and entity declarations are refused")


def _parse_chunks(chunks: Iterable[str], field_name: str) -> etree._Element:
    """Parse text fed in pieces with the safe parser, refusing any DTD or entity."""
    parser = _safe_parser()
    try:
        for chunk in chunks:
            parser.feed(chunk)
        root = parser.close()
    except etree.XMLSyntaxError as exc:
        raise SpecError(f"{field_name}: not well-formed XML ({exc})") from exc
    except ValueError as exc:
        raise SpecError(f"{field_name}: cannot be parsed ({exc})") from exc
    docinfo = root.getroottree().docinfo
    # lxml-stubs lacks DocInfo.doctype, hence getattr.
    doctype = getattr(docinfo, "doctype", "")
    if doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise SpecError(f"{field_name}: DTD and entity declarations are refused")
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        raise SpecError(f"{field_name}: entity references are refused")
    return root


def parse_untrusted(xml: str) -> etree._Element:
    """Parse an XML document from outside without entities, DTDs or network access."""
    text = _require_str(xml, "xml")
    _refuse_dtd_text(text, "xml")
    return _parse_chunks([text], "xml")


def _parse_extra_devices(fragment: str) -> list[etree._Element]:
    """Parse an admin's <devices> children and refuse kinds or attributes that reach the host."""
    text = _require_str(fragment, "extra_devices")
    if len(text) > MAX_EXTRA_DEVICES_CHARS:
        raise SpecError(f"extra_devices: longer than {MAX_EXTRA_DEVICES_CHARS} characters")
    _refuse_dtd_text(text, "extra_devices")
    # A fragment may hold several elements, so it is parsed inside a wrapper root. The wrapper
    # is only parser input; anything that closes it early leaves a second root and fails to parse.
    root = _parse_chunks(["<devices>", text, "</devices>"], "extra_devices")
    if (root.text or "").strip():
        raise SpecError("extra_devices: text outside device elements")
    devices: list[etree._Element] = []
    for child in root:
        if (child.tail or "").strip():
            raise SpecError("extra_devices: text outside device elements")
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if tag not in ALLOWED_EXTRA_DEVICES:
            allowed = ", ".join(sorted(ALLOWED_EXTRA_DEVICES))
            raise SpecError(f"extra_devices: <{tag}> is not allowed (allowed: {allowed})")
        _check_device_subtree(child)
        devices.append(child)
    if not devices:
        raise SpecError("extra_devices: no device elements found")
    return devices


def _check_device_subtree(device: etree._Element) -> None:
    for node in device.iter():
        tag = node.tag
        if not isinstance(tag, str):
            continue
        if tag.startswith("{"):
            raise SpecError(f"extra_devices: namespaced element {tag} is not allowed")
        for attribute in node.attrib:
            name = str(attribute)
            if name.startswith("{") or name in _HOST_PATH_ATTRIBUTES:
                raise SpecError(
                    f"extra_devices: attribute {name!r} on <{tag}> would name a host resource"
                )
        if tag == "backend" and device.tag == "rng" and node.get("model") == "random":
            source = (node.text or "").strip()
            if source and source not in _RNG_RANDOM_BACKENDS:
                raise SpecError(f"extra_devices: rng backend {source!r} is not a random device")


# --------------------------------------------------------------------------- building


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _cdrom_bus(spec: GuestSpec) -> str:
    # q35 and non-PC machines have no IDE controller; the i440fx 'pc' family does.
    machine = spec.machine or "pc"
    if spec.arch in ("x86_64", "i686") and (machine == "pc" or "i440fx" in machine):
        return "ide"
    return "sata"


def _cdrom_target(spec: GuestSpec, bus: str, devices: etree._Element | None = None) -> str:
    prefix = "hd" if bus == "ide" else "sd"
    used = {disk.target for disk in spec.disks}
    if devices is not None:  # CD-ROMs added already
        used |= {str(t.get("dev")) for t in devices.iterfind("disk/target")}
    # hdc is the traditional secondary-master CD slot; fall back to any free letter.
    for letter in "cdefghijklmnopqrstuvwxyzab":
        candidate = prefix + letter
        if candidate not in used:
            return candidate
    raise SpecError("disks: no free target name left for the install CD-ROM")


def _add_disk(devices: etree._Element, disk: DiskSpec) -> None:
    element = _sub(devices, "disk", type="volume", device="disk")
    _sub(element, "driver", name="qemu", type=disk.format)
    _sub(element, "source", pool=disk.source.pool, volume=disk.source.volume)
    _sub(element, "target", dev=disk.target, bus=disk.bus)


def _add_cdrom(devices: etree._Element, spec: GuestSpec) -> None:
    iso = spec.media.iso
    bus = _cdrom_bus(spec)
    if isinstance(iso, VolumeRef):
        element = _sub(devices, "disk", type="volume", device="cdrom")
        _sub(element, "driver", name="qemu", type="raw")
        _sub(element, "source", pool=iso.pool, volume=iso.volume)
    else:
        element = _sub(devices, "disk", type="file", device="cdrom")
        _sub(element, "driver", name="qemu", type="raw")
        _sub(element, "source", file=str(iso))
    _sub(element, "target", dev=_cdrom_target(spec, bus), bus=bus)
    _sub(element, "readonly")


def _add_seed(devices: etree._Element, spec: GuestSpec, seed: VolumeRef) -> None:
    """A read-only CD-ROM from a pool volume (a cloud-init seed, an OEMDRV answer file)."""
    bus = _cdrom_bus(spec)
    target = _cdrom_target(spec, bus, devices)
    element = _sub(devices, "disk", type="volume", device="cdrom")
    _sub(element, "driver", name="qemu", type="raw")
    _sub(element, "source", pool=seed.pool, volume=seed.volume)
    _sub(element, "target", dev=target, bus=bus)
    _sub(element, "readonly")


def _add_agent(devices: etree._Element) -> None:
    # libvirt picks the host-side socket itself (under its own run directory).
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)


def _add_nic(devices: etree._Element, nic: NicSpec) -> None:
    if nic.network is not None:
        element = _sub(devices, "interface", type="network")
        _sub(element, "mac", address=nic.mac.lower())
        _sub(element, "source", network=nic.network)
    elif nic.bridge is not None:
        element = _sub(devices, "interface", type="bridge")
        _sub(element, "mac", address=nic.mac.lower())
        _sub(element, "source", bridge=nic.bridge)
    else:
        element = _sub(devices, "interface", type="user")
        _sub(element, "mac", address=nic.mac.lower())
    _sub(element, "model", type=nic.model)


def _add_os(root: etree._Element, spec: GuestSpec, phase: Phase) -> None:
    installing = phase == "install" and spec.method not in ONE_PHASE_METHODS
    if not installing and spec.final_boot == "bootloader":
        # Xen PV style: a host-side bootloader picks the kernel out of the guest's disk.
        _sub(root, "bootloader", str(spec.bootloader))
    os_element = _sub(root, "os")
    type_attrs = {"arch": spec.arch}
    if spec.machine is not None:
        type_attrs["machine"] = spec.machine
    _sub(os_element, "type", "hvm", **type_attrs)
    if (installing and spec.method == "kernel") or (not installing and spec.final_boot == "kernel"):
        _sub(os_element, "kernel", str(spec.media.kernel))
        _sub(os_element, "initrd", str(spec.media.initrd))
        if spec.media.cmdline:
            _sub(os_element, "cmdline", spec.media.cmdline)
        return
    if not installing and spec.final_boot == "bootloader":
        return
    if spec.method == "cloud" and spec.media.kernel is not None:
        # A cloud image's own kernel and initrd, booted directly: the image needs no bootloader.
        _sub(os_element, "kernel", str(spec.media.kernel))
        _sub(os_element, "initrd", str(spec.media.initrd))
        if spec.media.cmdline:
            _sub(os_element, "cmdline", spec.media.cmdline)
        return
    _sub(os_element, "boot", dev="hd")
    if installing and spec.method == "cdrom":
        _sub(os_element, "boot", dev="cdrom")
    elif installing and spec.method == "pxe":
        _sub(os_element, "boot", dev="network")


def _add_metadata(root: etree._Element, metadata: Mapping[str, str]) -> None:
    container = _sub(root, "metadata")
    guest = etree.SubElement(
        container, etree.QName(METADATA_NS, "guest"), nsmap={METADATA_PREFIX: METADATA_NS}
    )
    for key, value in metadata.items():
        etree.SubElement(guest, etree.QName(METADATA_NS, key)).text = value


def build_xml(spec: GuestSpec, phase: Phase) -> str:
    """Render spec as a libvirt domain XML document for the install or final phase."""
    _require_choice(phase, get_args(Phase), "phase")
    _validate(spec)
    installing = phase == "install" and spec.method not in ONE_PHASE_METHODS

    root = etree.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid.lower())
    _add_metadata(root, spec.metadata)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    _add_os(root, spec, phase)
    features = _sub(root, "features")
    # ACPI is what lets an installer's `poweroff -f` actually stop the domain.
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    # Install runs end on reboot so the persistent final config takes over (virt-install style).
    _sub(root, "on_reboot", "destroy" if installing else "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    if spec.emulator is not None:
        _sub(devices, "emulator", spec.emulator)
    for disk in spec.disks:
        _add_disk(devices, disk)
    if installing and spec.method == "cdrom":
        _add_cdrom(devices, spec)
    if spec.seed is not None:
        _add_seed(devices, spec, spec.seed)
    if installing and spec.answer_disk is not None:
        _add_seed(devices, spec, spec.answer_disk)
    for nic in spec.nics:
        _add_nic(devices, nic)
    serial = _sub(devices, "serial", type="pty")
    if spec.serial_log is not None:
        _sub(serial, "log", file=spec.serial_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    if spec.vnc:
        graphics = _sub(
            devices, "graphics", type="vnc", port="-1", autoport="yes", listen=spec.vnc_listen
        )
        _sub(graphics, "listen", type="address", address=spec.vnc_listen)
    if spec.agent:
        _add_agent(devices)
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    if spec.extra_devices is not None:
        devices.extend(_parse_extra_devices(spec.extra_devices))

    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")


def install_xml(spec: GuestSpec) -> str:
    """Domain XML for the transient installer run."""
    return build_xml(spec, "install")


def final_xml(spec: GuestSpec) -> str:
    """Domain XML for the persistent guest after installation."""
    return build_xml(spec, "final")


def read_metadata(xml: str) -> dict[str, str]:
    """Portal metadata (request, job, guest ids...) read back from a domain XML document."""
    root = parse_untrusted(xml)
    # dom.metadata(VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS) hands back just the element,
    # with its namespace stripped; a whole domain document holds it under <metadata>.
    if root.tag in ("guest", etree.QName(METADATA_NS, "guest").text):
        guest: etree._Element | None = root
        namespace = etree.QName(root).namespace
    else:
        guest = root.find(f"metadata/{{{METADATA_NS}}}guest")
        namespace = METADATA_NS
    if guest is None:
        return {}
    result: dict[str, str] = {}
    for child in guest:
        if not isinstance(child.tag, str):
            continue
        qname = etree.QName(child)
        if qname.namespace == namespace:
            result[qname.localname] = child.text or ""
    return result


def random_mac() -> str:
    """A random locally administered unicast MAC in QEMU's 52:54:00 range."""
    tail = secrets.token_bytes(3)
    return ":".join(["52", "54", "00", *(f"{octet:02x}" for octet in tail)])


def pretty(xml: str) -> str:
    """Re-indent an XML document for display."""
    root = parse_untrusted(xml)
    for node in root.iter():
        # Only whitespace between elements is reflowed; real text is kept as it is.
        if len(node) and node.text is not None and not node.text.strip():
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")
