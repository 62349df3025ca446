"""Helpers for tests that boot the tiny guest on real QEMU through this test process's libvirtd.

Everything a test makes carries the ``vmportal-qt-`` prefix plus a random token, and is
registered with a ``Tracker``, which destroys and removes that object (never others with the
prefix: other test processes share the folders) after the test or module, even when it failed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from django.conf import settings
from lxml import etree

from provisioning.demo import tinyguest
from provisioning.hypervisor import (
    EventListener,
    Hypervisor,
    HypervisorError,
    LifecycleEvent,
    destroy,
    get_info,
    remove_pool,
    undefine,
)
from provisioning.hypervisor import storage as hv_storage

ROOT = Path(__file__).resolve().parents[2]
# The tiny guest's build cache, shared with `make run` (provisioning/demo/tinyguest.py).
DEMO_CACHE = settings.DEMO_DIR
# KVM guests hang on these machines (see FIELD-NOTES): emulate unless told otherwise.
DOMAIN_TYPE = os.environ.get("VMPORTAL_TEST_DOMAIN_TYPE", "qemu")
# A folder QEMU (libvirt-qemu) and libvirt's dnsmasq (nobody) can read, outside the repo, so
# libvirt's relabelling of kernels and ISOs never touches the shared build cache. It and the pool
# folder are shared by every libvirtd on the machine (none mounts them privately).
STAGE_PARENT = Path(os.environ.get("VMPORTAL_TEST_STAGE_DIR", "/var/lib/libvirt/boot"))
POOL_PARENT = Path(os.environ.get("VMPORTAL_TEST_POOL_DIR", "/var/lib/libvirt/images"))
PREFIX = "vmportal-qt-"
MIB = 1024 * 1024


def unique(kind: str) -> str:
    """A fresh name for a throwaway libvirt object."""
    return f"{PREFIX}{kind}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- media


@dataclass(frozen=True)
class StagedMedia:
    """The tiny guest's install media, copied where QEMU and dnsmasq can read them."""

    root: Path
    kernel: Path
    initrd: Path
    iso: Path
    pxe_root: Path
    logs: Path


def stage_media(guest: tinyguest.TinyGuest, root: Path) -> StagedMedia:
    """Copy kernel, initrd, ISO and the PXE TFTP root into root (world-readable)."""
    root.mkdir(mode=0o755, parents=True)
    shutil.copyfile(guest.kernel, root / "vmlinuz")
    shutil.copyfile(guest.initrd, root / "initrd.img")
    shutil.copyfile(guest.iso, root / "tinyguest.iso")
    shutil.copytree(guest.pxe_root, root / "pxe")
    logs = root / "logs"
    logs.mkdir()
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return StagedMedia(
        root=root,
        kernel=root / "vmlinuz",
        initrd=root / "initrd.img",
        iso=root / "tinyguest.iso",
        pxe_root=root / "pxe",
        logs=logs,
    )


# --------------------------------------------------------------------------- console


def read_console(path: Path) -> str:
    """The serial log so far ('' before QEMU opened it)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_console(
    path: Path,
    done: Callable[[tinyguest.ConsoleReport], bool],
    *,
    timeout: float,
    what: str,
    every: float = 0.2,
) -> tinyguest.ConsoleReport:
    """Poll the serial log until done(report); fail with the log's tail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_console(path)
        report = tinyguest.parse_console(text)
        if done(report):
            return report
        if report.install_error is not None:
            raise AssertionError(f"installer failed ({report.install_error}) in {path}")
        if time.monotonic() >= deadline:
            tail = "\n".join(text.splitlines()[-25:])
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} in {path}:\n{tail}"
            )
        time.sleep(every)


# --------------------------------------------------------------------------- events


@dataclass
class EventLog:
    """Every lifecycle event a listener delivered, with a deadline-bound wait for one."""

    events: list[LifecycleEvent] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, event: LifecycleEvent) -> None:
        """EventListener callback."""
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def mark(self) -> int:
        """A cursor: wait(..., since=mark()) only sees events after this moment."""
        with self._changed:
            return len(self.events)

    def for_guest(self, uuid: str, since: int = 0) -> list[LifecycleEvent]:
        """The guest's events (after cursor since), oldest first."""
        with self._changed:
            return [e for e in self.events[since:] if e.uuid == uuid]

    def wait(self, uuid: str, event: str, *, timeout: float, since: int = 0) -> LifecycleEvent:
        """The guest's first event named event after cursor since; fail at the deadline."""
        deadline = time.monotonic() + timeout

        def found() -> LifecycleEvent | None:
            for candidate in self.events[since:]:
                if candidate.uuid == uuid and candidate.event == event:
                    return candidate
            return None

        with self._changed:
            while (hit := found()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(e.event, e.detail) for e in self.events[since:] if e.uuid == uuid]
                    raise AssertionError(
                        f"no {event!r} event for {uuid} within {timeout:.0f} s; saw {seen}"
                    )
                self._changed.wait(remaining)
            return hit


@contextlib.contextmanager
def listening(uri: str) -> Iterator[EventLog]:
    """An EventListener on uri recording into an EventLog, subscribed before the block runs."""
    log = EventLog()
    listener = EventListener(uri, log.record, readonly=True)
    listener.start()
    try:
        if not listener.wait_connected(15):
            raise AssertionError(f"event listener did not connect: {listener.last_error}")
        yield log
    finally:
        listener.stop()


# --------------------------------------------------------------------------- networks


def _used_ipv4_networks(hv: Hypervisor) -> list[ipaddress.IPv4Network]:
    """Networks in use on this machine: addresses, routes and libvirt networks' ranges."""
    used: list[ipaddress.IPv4Network] = []
    addr = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    for link in json.loads(addr.stdout or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    route = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True)
    for entry in json.loads(route.stdout or "[]"):
        dst = entry.get("dst", "")
        if dst and dst != "default":
            used.append(ipaddress.IPv4Network(dst, strict=False))

    def libvirt_networks(conn: libvirt.virConnect) -> list[str]:
        return [net.XMLDesc(0) for net in conn.listAllNetworks(0)]

    for xml in hv.call(libvirt_networks):
        for ip in etree.fromstring(xml.encode()).iterfind("ip"):
            address, netmask = ip.get("address"), ip.get("netmask") or ip.get("prefix")
            if address and netmask and ":" not in address:
                used.append(ipaddress.IPv4Network(f"{address}/{netmask}", strict=False))
    return used


def free_subnet(hv: Hypervisor) -> ipaddress.IPv4Network:
    """A private /24 in 10.200-254.x.0 that nothing on this machine uses."""
    used = _used_ipv4_networks(hv)
    for _ in range(200):
        candidate = ipaddress.IPv4Network(
            f"10.{200 + secrets.randbelow(55)}.{secrets.randbelow(256)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise AssertionError("no free 10.x.y.0/24 subnet found")


def isolated_pxe_network_xml(
    *, name: str, bridge: str, subnet: ipaddress.IPv4Network, tftp_root: Path, boot_file: str
) -> str:
    """An isolated network (no <forward>: reaches nothing) serving DHCP, BOOTP and TFTP."""
    hosts = list(subnet.hosts())
    root = etree.Element("network")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "bridge", name=bridge, stp="off", delay="0")
    ip = etree.SubElement(root, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    etree.SubElement(ip, "tftp", root=str(tftp_root))
    dhcp = etree.SubElement(ip, "dhcp")
    etree.SubElement(dhcp, "range", start=str(hosts[9]), end=str(hosts[49]))
    etree.SubElement(dhcp, "bootp", file=boot_file)
    return etree.tostring(root, encoding="unicode")


def create_network(hv: Hypervisor, xml: str) -> None:
    """Start a transient libvirt network (gone for good when destroyed)."""
    hv.call(lambda conn: conn.networkCreateXML(xml), idempotent=False)


def network_xml(hv: Hypervisor, name: str) -> str:
    """A running network's live XML."""
    return hv.call(lambda conn: conn.networkLookupByName(name).XMLDesc(0))


def dhcp_leases(hv: Hypervisor, name: str) -> list[dict[str, object]]:
    """The DHCP leases libvirt's dnsmasq handed out on a network."""
    return hv.call(lambda conn: list(conn.networkLookupByName(name).DHCPLeases()))


def destroy_network(hv: Hypervisor, name: str) -> None:
    """Stop (and, if persistent, undefine) a network; a missing one is fine."""

    def run(conn: libvirt.virConnect) -> None:
        try:
            net = conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return
            raise
        # A transient network is gone once destroyed, so ask about persistence first.
        persistent = net.isPersistent()
        if net.isActive():
            net.destroy()
        if persistent:
            net.undefine()

    hv.call(run)


# --------------------------------------------------------------------------- cleanup


@dataclass
class Tracker:
    """libvirt objects and folders a test made, removed newest first by close()."""

    hv: Hypervisor
    _undo: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def domain(self, uuid: str) -> str:
        """Destroy and undefine this guest at close."""

        def undo() -> None:
            destroy(self.hv, uuid)
            undefine(self.hv, uuid)
            if get_info(self.hv, uuid).exists:
                raise AssertionError(f"guest {uuid} still exists after cleanup")

        self._undo.append((f"domain {uuid}", undo))
        return uuid

    def volume(self, pool: str, name: str) -> str:
        """Delete this volume at close."""
        self._undo.append(
            (f"volume {pool}/{name}", lambda: hv_storage.delete_volume(self.hv, pool, name))
        )
        return name

    def pool(self, name: str, path: Path) -> str:
        """Remove this pool, every volume left in it and its (then empty) folder at close."""

        def undo() -> None:
            remove_pool(self.hv, name, delete_volumes=True)
            # remove_pool may keep the folder; an empty one is ours to remove.
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()

        self._undo.append((f"pool {name}", undo))
        return name

    def network(self, name: str) -> str:
        """Destroy this network at close."""
        self._undo.append((f"network {name}", lambda: destroy_network(self.hv, name)))
        return name

    def folder(self, path: Path) -> Path:
        """Delete this folder at close."""
        self._undo.append((f"folder {path}", lambda: shutil.rmtree(path, ignore_errors=True)))
        return path

    def close(self) -> None:
        """Undo everything, newest first; report every failure after trying them all."""
        failures = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except (HypervisorError, libvirt.libvirtError, OSError, AssertionError) as exc:
                failures.append(f"{what}: {exc}")
        if failures:
            raise AssertionError("cleanup failed: " + "; ".join(failures))
