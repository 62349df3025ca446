"""The KVM probe's cheap paths (the booting ones are in test_qemu)."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from provisioning.hypervisor import Hypervisor, list_domains, probe_kvm
from provisioning.hypervisor.probe import PROBE_NAME_PREFIX, probe_xml


def test_probe_kvm_is_false_without_kvm_in_the_capabilities(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    before = {info.uuid for info in list_domains(test_hv)}

    works = probe_kvm(test_hv, "/no/kernel", "/no/initrd", tmp_path / "console.log", timeout=1)

    assert works is False
    assert {info.uuid for info in list_domains(test_hv)} == before


def test_probe_xml_is_a_serial_logged_direct_kernel_boot() -> None:
    xml = probe_xml(
        name=f"{PROBE_NAME_PREFIX}x",
        uuid="0b6c1c36-0000-4000-8000-000000000001",
        kernel="/k",
        initrd="/i",
        console_log="/tmp/c.log",
    )

    root = etree.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.findtext("os/kernel") == "/k"
    assert root.findtext("os/initrd") == "/i"
    assert "console=ttyS0" in (root.findtext("os/cmdline") or "")
    assert root.find("features/acpi") is not None
    assert root.xpath("string(devices/serial/log/@file)") == "/tmp/c.log"
