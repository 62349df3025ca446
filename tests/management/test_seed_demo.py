"""`seed_demo` builds the tiny guest and registers it, with its pool, on the local host.

The local host is this process's own libvirtd (QEMU driver); the pool's folder,
/var/lib/libvirt/images/vmportal, is shared by every daemon on the machine.
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import pytest
from django.core.management import call_command
from lxml import etree

from provisioning.hypervisor import networks, storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import GuestTemplate, Host, Media, StoragePool
from provisioning.services.demo import (
    CDROM_TEMPLATE_NAME,
    DEMO_NETWORK_NAME,
    DEMO_POOL_NAME,
    DEMO_TEMPLATE_NAME,
    IMPORT_TEMPLATE_NAME,
    PERSISTENT_TEMPLATE_NAME,
    PXE_NETWORK_NAME,
    PXE_TEMPLATE_NAME,
    TRANSIENT_TEMPLATE_NAME,
    demo_network,
)
from tests.factories import make_host
from tests.support.libvirt import QEMU_URI
from tests.support.netns import NetnsHost

pytestmark = [pytest.mark.qemu, pytest.mark.django_db]


def test_it_registers_the_tiny_guest_template_once(settings, capsys) -> None:
    settings.LIBVIRT_URI = QEMU_URI
    settings.VMPORTAL_DOMAIN_TYPE = "auto"
    call_command("seed_demo")
    call_command("seed_demo")

    host = Host.objects.get()
    assert host.uri == QEMU_URI
    assert host.detected_domain_type in {"kvm", "qemu"}
    template = GuestTemplate.objects.get(name=DEMO_TEMPLATE_NAME)
    assert template.method == GuestTemplate.Method.KERNEL
    assert "vmportal.install=1" in template.kernel_cmdline
    assert template.media is not None and template.media.kind == Media.Kind.KERNEL
    for path in (template.media.kernel_path, template.media.initrd_path):
        assert Path(path).stat().st_size > 1_000_000
    assert StoragePool.objects.filter(host=host, name=DEMO_POOL_NAME).count() == 1
    assert template.pool is not None and template.pool.name == DEMO_POOL_NAME
    pool = storage.get_pool(get_hypervisor(host.uri), DEMO_POOL_NAME)
    assert pool.active
    out = capsys.readouterr().out
    assert f"domain type '{host.detected_domain_type}'" in out
    assert "present on local" in out


def test_the_demo_network_is_made_once_with_nat_and_dhcp_and_never_over_another(
    netns_host: NetnsHost,
) -> None:
    # On the namespaced libvirtd: its bridge, NAT rules and DHCP server exist only in there.
    host = make_host("local", uri=netns_host.uri, pool=None)
    hv = get_hypervisor(netns_host.uri)
    subnet = ipaddress.IPv4Network(
        f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24"
    )
    try:
        made = demo_network(host=host, subnet=subnet)
        again = demo_network(host=host, subnet=subnet)
        assert made.pk == again.pk and made.source == DEMO_NETWORK_NAME
        xml = hv.call(lambda conn: conn.networkLookupByName(DEMO_NETWORK_NAME).XMLDesc(0))
        root = etree.fromstring(xml.encode())
        assert root.find("forward").get("mode") == "nat"
        assert root.find("ip").get("address") == str(next(subnet.hosts()))
        assert root.find("ip/dhcp/range") is not None
        assert networks.network_subnets(hv)[DEMO_NETWORK_NAME] == [subnet]
        # Another libvirt network on that subnet: the demo's refuses to go over it.
        other = f"vpo{secrets.token_hex(3)}"
        beside = ipaddress.IPv4Network(f"{subnet.network_address + 256}/24")
        networks.ensure_network(hv, other, bridge=other, subnet=beside, nat=False)
        with pytest.raises(HypervisorError, match=f"is used by the libvirt network.*{other}"):
            demo_network(host=host, subnet=beside)
    finally:

        def drop(conn) -> None:  # type: ignore[no-untyped-def]
            for net in conn.listAllNetworks(0):
                if net.name() in (DEMO_NETWORK_NAME,) or net.name().startswith("vpo"):
                    if net.isActive():
                        net.destroy()
                    net.undefine()

        hv.call(drop, idempotent=False)


def test_methods_registers_a_template_for_every_mode_and_an_isolated_pxe_network(
    netns_host: NetnsHost, settings, capsys
) -> None:
    # make run's seed_demo --methods, on the namespaced libvirtd (its PXE network's DHCP and
    # TFTP exist only in there).
    settings.LIBVIRT_URI = netns_host.uri
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    hv = get_hypervisor(netns_host.uri)
    try:
        call_command("seed_demo", "--methods")
        call_command("seed_demo", "--methods")
        names = set(GuestTemplate.objects.values_list("name", flat=True))
        assert names == {
            DEMO_TEMPLATE_NAME,
            CDROM_TEMPLATE_NAME,
            PXE_TEMPLATE_NAME,
            TRANSIENT_TEMPLATE_NAME,
            PERSISTENT_TEMPLATE_NAME,
            IMPORT_TEMPLATE_NAME,
        }
        methods = dict(GuestTemplate.objects.values_list("name", "method"))
        assert methods[CDROM_TEMPLATE_NAME] == "cdrom" and methods[PXE_TEMPLATE_NAME] == "pxe"
        imported = GuestTemplate.objects.get(name=IMPORT_TEMPLATE_NAME)
        assert storage.get_volume(hv, DEMO_POOL_NAME, imported.base_volume).capacity > 0
        xml = hv.call(lambda conn: conn.networkLookupByName(PXE_NETWORK_NAME).XMLDesc(0))
        root = etree.fromstring(xml.encode())
        assert root.find("forward") is None, "isolated: no forwarding"
        assert Path(root.find("ip/tftp").get("root"), "pxelinux.0").is_file()
        assert root.find("ip/dhcp/bootp").get("file") == "pxelinux.0"
        assert capsys.readouterr().out.count("present on local") >= 6
    finally:

        def drop(conn) -> None:  # type: ignore[no-untyped-def]
            net = conn.networkLookupByName(PXE_NETWORK_NAME)
            if net.isActive():
                net.destroy()
            net.undefine()

        hv.call(drop, idempotent=False)
