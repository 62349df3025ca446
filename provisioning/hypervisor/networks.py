"""libvirt virtual networks: guests' own bridges with DHCP, made by name, never the host's."""

from __future__ import annotations

import ipaddress

import libvirt
from lxml import etree

from .connection import Hypervisor

__all__ = ["ensure_network", "network_subnets"]


def _network_xml(
    name: str,
    bridge: str,
    subnet: ipaddress.IPv4Network,
    nat: bool,
    tftp_root: str | None = None,
    boot_file: str | None = None,
) -> str:
    hosts = list(subnet.hosts())
    root = etree.Element("network")
    etree.SubElement(root, "name").text = name
    if nat:
        etree.SubElement(root, "forward", mode="nat")
    # Without <forward> the network is isolated: guests reach the host's side of it, no further.
    etree.SubElement(root, "bridge", name=bridge, stp="on", delay="0")
    ip = etree.SubElement(root, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    if tftp_root is not None:
        # libvirt's dnsmasq serves this folder over TFTP, for PXE installs.
        etree.SubElement(ip, "tftp", root=tftp_root)
    dhcp = etree.SubElement(ip, "dhcp")
    etree.SubElement(dhcp, "range", start=str(hosts[min(9, len(hosts) - 2)]), end=str(hosts[-1]))
    if boot_file is not None:
        etree.SubElement(dhcp, "bootp", file=boot_file)
    return etree.tostring(root, encoding="unicode")


def network_subnets(hv: Hypervisor) -> dict[str, list[ipaddress.IPv4Network]]:
    """The IPv4 subnets of every libvirt network on the host, by network name."""

    def run(conn: libvirt.virConnect) -> dict[str, list[ipaddress.IPv4Network]]:
        out: dict[str, list[ipaddress.IPv4Network]] = {}
        for net in conn.listAllNetworks(0):
            root = etree.fromstring(net.XMLDesc(0).encode())
            nets = []
            for ip in root.iterfind("ip"):
                address, mask = ip.get("address"), ip.get("netmask") or ip.get("prefix")
                if address and mask and ":" not in address:
                    nets.append(ipaddress.IPv4Network(f"{address}/{mask}", strict=False))
            out[net.name()] = nets
        return out

    return hv.call(run)


def ensure_network(
    hv: Hypervisor,
    name: str,
    *,
    bridge: str,
    subnet: ipaddress.IPv4Network,
    nat: bool,
    tftp_root: str | None = None,
    boot_file: str | None = None,
) -> bool:
    """Define, start and autostart network `name` unless it exists (then only start it).

    With tftp_root and boot_file its DHCP hands out that boot file and serves the folder by
    TFTP (PXE). True when it was made here. An existing network is left as it is configured.
    """

    def run(conn: libvirt.virConnect) -> bool:
        made = False
        try:
            net = conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
            xml = _network_xml(name, bridge, subnet, nat, tftp_root, boot_file)
            net = conn.networkDefineXML(xml)
            made = True
        if not net.isActive():
            net.create()
        if made:
            net.setAutostart(1)
        return made

    return hv.call(run, idempotent=False)
