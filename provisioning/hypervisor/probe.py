"""Does KVM really work here? Boot a throwaway guest and watch its serial console.

/dev/kvm and the capabilities can both say yes while KVM guests hang without output (seen on
these machines), so the only trustworthy answer is a kernel banner on the serial console.
"""

from __future__ import annotations

import logging
import time
import uuid as uuid_module
from pathlib import Path

import libvirt
from lxml import etree

from . import operations
from .connection import Hypervisor
from .errors import HypervisorError
from .types import GuestState

log = logging.getLogger(__name__)

__all__ = ["PROBE_NAME_PREFIX", "probe_boot", "probe_kvm", "probe_xml"]

PROBE_NAME_PREFIX = "vmportal-kvm-probe-"
BANNER = b"Linux version"
POLL_INTERVAL = 0.2


def probe_xml(
    *,
    name: str,
    uuid: str,
    kernel: str,
    initrd: str,
    console_log: str,
    domain_type: str = "kvm",
    memory_mib: int = 256,
) -> str:
    """Domain XML for a one-vCPU, diskless, networkless direct-kernel-boot probe guest."""
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    etree.SubElement(root, "vcpu").text = "1"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type").text = "hvm"
    etree.SubElement(os_el, "kernel").text = kernel
    etree.SubElement(os_el, "initrd").text = initrd
    etree.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1"
    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "destroy"
    # A crash leaves the (persistent) probe guest shut off with reason 'crashed': a failure.
    etree.SubElement(root, "on_crash").text = "destroy"
    devices = etree.SubElement(root, "devices")
    serial = etree.SubElement(devices, "serial", type="pty")
    etree.SubElement(serial, "log", file=console_log, append="off")
    etree.SubElement(serial, "target", port="0")
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(root, encoding="unicode")


def _banner_seen(path: Path) -> bool:
    try:
        return BANNER in path.read_bytes()
    except FileNotFoundError:
        return False


def _remove_leftovers(hv: Hypervisor) -> None:
    """Undefine shut-off probe guests left by a probing process that died."""
    for info in operations.list_domains(hv):
        if info.name.startswith(PROBE_NAME_PREFIX) and not info.active:
            operations.undefine(hv, info.uuid)


def probe_kvm(
    hv: Hypervisor,
    kernel: str | Path,
    initrd: str | Path,
    console_log: str | Path,
    timeout: float = 20.0,
) -> bool:
    """True only if the host offers KVM and a KVM guest really boots (see probe_boot)."""
    if "kvm" not in hv.capabilities_domain_types():
        log.info("no kvm domain type offered by %s", hv.uri)
        return False
    return probe_boot(hv, kernel, initrd, console_log, timeout, domain_type="kvm")


def probe_boot(
    hv: Hypervisor,
    kernel: str | Path,
    initrd: str | Path,
    console_log: str | Path,
    timeout: float = 20.0,
    *,
    domain_type: str = "kvm",
) -> bool:
    """True only if a guest of domain_type prints its kernel banner in time and is still fine.

    The probe guest is persistent (so its shut-off reason can be read), started with
    AUTODESTROY (so it dies with this connection if we do) and always destroyed and undefined.
    """
    _remove_leftovers(hv)
    guest_uuid = str(uuid_module.uuid4())
    log_path = Path(console_log)
    log_path.unlink(missing_ok=True)
    xml = probe_xml(
        name=PROBE_NAME_PREFIX + guest_uuid[:8],
        uuid=guest_uuid,
        kernel=str(kernel),
        initrd=str(initrd),
        console_log=str(log_path),
        domain_type=domain_type,
    )
    deadline = time.monotonic() + timeout
    try:
        operations.define(hv, xml)
        hv.call(
            lambda conn: conn.lookupByUUIDString(guest_uuid).createWithFlags(
                libvirt.VIR_DOMAIN_START_AUTODESTROY
            ),
            idempotent=False,
        )
        while not _banner_seen(log_path) and time.monotonic() < deadline:
            if not operations.get_info(hv, guest_uuid).active:
                break  # died before printing anything useful
            time.sleep(POLL_INTERVAL)
        if not _banner_seen(log_path):
            log.info("%s probe on %s: no kernel banner within %.0f s", domain_type, hv.uri, timeout)
            return False
        info = operations.get_info(hv, guest_uuid)
        log.info(
            "%s probe on %s: banner seen, guest %s (%s)",
            domain_type,
            hv.uri,
            info.state,
            info.reason,
        )
        return info.state is GuestState.RUNNING or (
            info.state is GuestState.DEFINED and info.reason == "shutdown"
        )
    except HypervisorError as exc:
        log.info("%s probe on %s failed: %s", domain_type, hv.uri, exc)
        return False
    finally:
        try:
            operations.destroy(hv, guest_uuid)
            operations.undefine(hv, guest_uuid)
        except HypervisorError as exc:
            log.warning("could not remove probe guest %s: %s", guest_uuid, exc)
