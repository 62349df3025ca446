"""The install anchor: the tiny guest's two-phase install with nothing but libvirt-python.

What a careful script does by hand: a qcow2 volume, createXML(installer) then defineXML(final)
at once (virt-install's way), wait for the installer's own power-off (a lifecycle event), then
create() the persistent guest from its disk. The domain XML is the portal's (same guest, same
devices), so only the machinery around it differs. Prints one JSON line: uuid, volume, seconds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid as uuidlib
from dataclasses import replace

import libvirt
from lxml import etree

from provisioning.hypervisor import domxml


def volume_xml(name: str, mib: int) -> str:
    """A thin qcow2 volume of mib MiB."""
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "capacity", unit="MiB").text = str(mib)
    etree.SubElement(root, "allocation", unit="bytes").text = "0"
    target = etree.SubElement(root, "target")
    etree.SubElement(target, "format", type="qcow2")
    return etree.tostring(root, encoding="unicode")


def _run_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--name", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd", required=True)
    parser.add_argument("--cmdline", required=True)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--domain-type", default="qemu")
    parser.add_argument("--install-log", required=True)
    parser.add_argument("--final-log", required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    started = time.monotonic()

    # Events need the loop registered before the connection opens.
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=_run_loop, daemon=True).start()
    conn = libvirt.open(args.uri)
    guest_uuid = str(uuidlib.uuid4())
    stopped = threading.Event()
    how: dict[str, int] = {}

    def on_lifecycle(
        _c: object, dom: libvirt.virDomain, event: int, detail: int, _o: object
    ) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and dom.UUIDString() == guest_uuid:
            how["detail"] = detail
            stopped.set()

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)

    volume = f"{args.name}.qcow2"
    conn.storagePoolLookupByName(args.pool).createXML(volume_xml(volume, args.disk_mib), 0)
    spec = domxml.GuestSpec(
        name=args.name,
        uuid=guest_uuid,
        memory_mib=args.memory_mib,
        vcpus=1,
        method="kernel",
        domain_type=args.domain_type,
        disks=(domxml.DiskSpec(domxml.VolumeRef(args.pool, volume)),),
        media=domxml.BootMedia(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline),
        serial_log=args.install_log,
    )
    conn.createXML(domxml.install_xml(spec), 0)
    conn.defineXML(domxml.final_xml(replace(spec, serial_log=args.final_log)))
    installing = time.monotonic() - started
    if not stopped.wait(args.timeout):
        raise SystemExit(f"the installer did not power off within {args.timeout:.0f} s")
    if how["detail"] != libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
        raise SystemExit(f"the installer stopped without finishing (detail {how['detail']})")
    installed = time.monotonic() - started
    dom = conn.lookupByUUIDString(guest_uuid)
    dom.create()
    if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
        raise SystemExit(f"phase 2 is not running: state {dom.state()}")
    seconds = time.monotonic() - started
    phases = {"installer_started": installing, "installer_stopped": installed, "running": seconds}
    report = {"uuid": guest_uuid, "volume": volume, "seconds": seconds, "phases": phases}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
