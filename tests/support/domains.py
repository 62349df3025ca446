"""Throwaway guests for the hypervisor layer's tests: uuids, minimal domain XML, cleanup.

Plain libvirt documents and calls only (no Django): the hypervisor tests run without a database.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field

from lxml import etree

from provisioning.hypervisor import Hypervisor, HypervisorError, destroy, undefine
from tests.support.libvirt import TEST_URI

# Stated here rather than imported from domxml, so a test that finds guests by it does not
# borrow the namespace from the code under test.
METADATA_NS = "https://vmportal.dev/xmlns/guest/1"
# The test driver behind a socket that does not exist: a daemon that never answers.
UNREACHABLE_TEST_URI = TEST_URI.split("?", 1)[0] + "?socket=/nonexistent/libvirt-sock"


def new_uuid() -> str:
    return str(uuid_module.uuid4())


def domain_xml(
    *,
    uuid: str,
    name: str | None = None,
    domain_type: str = "test",
    memory_mib: int = 16,
    on_poweroff: str = "destroy",
    on_reboot: str = "restart",
    metadata: Mapping[str, str] | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    disk: tuple[str, str] | None = None,
    serial_log: str | None = None,
    vnc: bool = False,
) -> str:
    """A minimal domain document; kernel/disk/serial make it bootable on QEMU, vnc gives it a
    display on the host's loopback."""
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = name or f"vmportal-hvtest-{uuid[:8]}"
    etree.SubElement(root, "uuid").text = uuid
    if metadata:
        container = etree.SubElement(root, "metadata")
        guest = etree.SubElement(
            container, etree.QName(METADATA_NS, "guest"), nsmap={"vmportal": METADATA_NS}
        )
        for key, value in metadata.items():
            etree.SubElement(guest, etree.QName(METADATA_NS, key)).text = value
    etree.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    etree.SubElement(root, "vcpu").text = "1"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type").text = "hvm"
    if kernel:
        etree.SubElement(os_el, "kernel").text = kernel
    if initrd:
        etree.SubElement(os_el, "initrd").text = initrd
    if cmdline:
        etree.SubElement(os_el, "cmdline").text = cmdline
    features = etree.SubElement(root, "features")
    # Without ACPI an in-guest poweroff only halts and the domain never stops.
    etree.SubElement(features, "acpi")
    etree.SubElement(root, "on_poweroff").text = on_poweroff
    etree.SubElement(root, "on_reboot").text = on_reboot
    etree.SubElement(root, "on_crash").text = "destroy"
    devices = etree.SubElement(root, "devices")
    if disk is not None:
        pool, volume = disk
        disk_el = etree.SubElement(devices, "disk", type="volume", device="disk")
        etree.SubElement(disk_el, "driver", name="qemu", type="qcow2")
        etree.SubElement(disk_el, "source", pool=pool, volume=volume)
        etree.SubElement(disk_el, "target", dev="vda", bus="virtio")
    if serial_log is not None:
        serial = etree.SubElement(devices, "serial", type="pty")
        etree.SubElement(serial, "log", file=serial_log, append="off")
        etree.SubElement(serial, "target", port="0")
    if vnc:
        etree.SubElement(
            devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1"
        )
    if domain_type != "test":
        etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(root, encoding="unicode")


@dataclass
class Cleanup:
    """Guests a test made, destroyed and undefined after it."""

    hv: Hypervisor
    uuids: list[str] = field(default_factory=list)

    def add(self, uuid: str) -> str:
        self.uuids.append(uuid)
        return uuid

    def run(self) -> None:
        for uuid in reversed(self.uuids):
            try:
                destroy(self.hv, uuid)
                undefine(self.hv, uuid)
            except HypervisorError as exc:  # keep cleaning the others
                print(f"cleanup of {uuid} failed: {exc}")
