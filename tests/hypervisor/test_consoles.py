"""The console helpers that need no guest: which URIs are local, where a display is reached."""

from __future__ import annotations

import pytest
from lxml import etree

from provisioning.hypervisor.consoles import display_of, is_local_uri
from provisioning.hypervisor.errors import Unsupported, WrongState


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("qemu:///system", True),
        ("qemu+unix:///system?socket=/run/x/libvirt-sock", True),
        ("test+unix:///default", True),
        ("qemu+ssh://root@hv2/system", False),
        ("qemu+tcp://10.0.0.2/system", False),
        ("qemu+tls://hv3.example/system", False),
    ],
)
def test_local_uris_are_the_unix_socket_ones(uri: str, local: bool) -> None:
    assert is_local_uri(uri) is local


def live_xml(listen: str | None, port: str | None = "5901", kind: str = "vnc") -> str:
    root = etree.Element("domain", type="qemu")
    devices = etree.SubElement(root, "devices")
    attrs = {"type": kind}
    if port is not None:
        attrs["port"] = port
    if listen is not None:
        attrs["listen"] = listen
    etree.SubElement(devices, "graphics", attrs)
    return etree.tostring(root, encoding="unicode")


def test_a_remote_hosts_display_is_reached_at_its_display_address() -> None:
    assert display_of(live_xml("192.0.2.7"), "qemu+ssh://hv2/system") == ("192.0.2.7", 5901)


def test_a_display_on_every_address_is_reached_at_the_hosts_name() -> None:
    assert display_of(live_xml("0.0.0.0"), "qemu+ssh://hv2/system") == ("hv2", 5901)


def test_a_local_hosts_loopback_display_is_reachable_and_a_remote_ones_is_refused() -> None:
    assert display_of(live_xml("127.0.0.1"), "qemu:///system") == ("127.0.0.1", 5901)
    with pytest.raises(Unsupported, match="display address"):
        display_of(live_xml("127.0.0.1"), "qemu+ssh://hv2/system")


def test_no_display_or_no_port_is_refused_with_a_reason() -> None:
    with pytest.raises(Unsupported, match="no VNC display"):
        display_of(live_xml("127.0.0.1", kind="spice"), "qemu:///system")
    with pytest.raises(WrongState, match="no port"):
        display_of(live_xml("127.0.0.1", port="-1"), "qemu:///system")
