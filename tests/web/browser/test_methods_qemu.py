"""Every provisioning mode one click away: a user clicks each demo card and gets a running guest.

The demo's six templates (make run's seed_demo --methods) on a libvirtd in a network namespace
of this run's own, so the PXE network's DHCP and TFTP stay inside it. All six requests are made
from the browser, then each request page is watched to Running and each guest page checked for
what its mode leaves: the installer's marker on the disk, transient or persistent.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import Page, expect

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.models import Guest, GuestTemplate
from provisioning.services import demo
from tests.factories import PASSWORD, make_host
from tests.support.browser import log_in
from tests.support.flows import (
    ask_for_guest,
    landed_on_request,
    listener_connected,
    new_name,
    remove_qemu_guest,
)
from tests.support.netns import NetnsHost
from tests.support.qemu import free_subnet
from tests.support.stack import Stack, wait_until
from tests.support.terminal import wait_for_text

pytestmark = [pytest.mark.browser, pytest.mark.qemu, pytest.mark.timeout(420)]

INSTALL_MS = 240_000  # six guests under TCG on two cores at once
# What each card's guest shows on its serial console once it runs.
SHOWS = {
    demo.DEMO_TEMPLATE_NAME: "VMPORTAL-DISK: installed",
    demo.CDROM_TEMPLATE_NAME: "VMPORTAL-DISK: cdrom",
    demo.PXE_TEMPLATE_NAME: "VMPORTAL-DISK: pxe",
    demo.TRANSIENT_TEMPLATE_NAME: "VMPORTAL-READY",
    demo.PERSISTENT_TEMPLATE_NAME: "VMPORTAL-READY",
    demo.IMPORT_TEMPLATE_NAME: "VMPORTAL-READY",
}
PERSISTENT = {
    demo.DEMO_TEMPLATE_NAME: True,
    demo.CDROM_TEMPLATE_NAME: True,
    demo.PXE_TEMPLATE_NAME: True,
    demo.TRANSIENT_TEMPLATE_NAME: False,
    demo.PERSISTENT_TEMPLATE_NAME: True,
    demo.IMPORT_TEMPLATE_NAME: True,
}


@dataclass
class Methods:
    hv: Hypervisor
    templates: list[GuestTemplate]
    names: list[str] = field(default_factory=list)


@pytest.fixture
def methods(netns_stack: Stack, netns_host: NetnsHost) -> Iterator[Methods]:
    hv = get_hypervisor(netns_host.uri)
    host = make_host("local", uri=netns_host.uri, pool=None)
    # Names unique on the machine: every libvirtd shares /var/lib/libvirt/dnsmasq.
    net = new_name("vmportal-pxe-")
    pxe = demo.pxe_network(
        host=host, subnet=free_subnet(hv), name=net, bridge=f"vpx{secrets.token_hex(3)}"
    )
    made = demo.demo_seed_methods(host=host, log=print, pxe=pxe)
    found = Methods(hv, [demo.demo_seed(host=host, log=print), *made])
    try:
        yield found
    finally:
        for name in found.names:
            remove_qemu_guest(hv, name, demo.DEMO_POOL_NAME)

        def drop(conn) -> None:  # type: ignore[no-untyped-def]
            network = conn.networkLookupByName(net)
            if network.isActive():
                network.destroy()
            network.undefine()

        hv.call(drop, idempotent=False)


def test_each_of_the_six_cards_gives_a_running_guest(
    netns_stack: Stack, methods: Methods, make_user, page: Page
) -> None:
    make_user("ann")
    netns_stack.start("listener", "worker", "beat", "web")
    wait_until(listener_connected, timeout=60, what="the listener to subscribe to libvirt")
    base = netns_stack.base_url
    log_in(page, base, "ann", PASSWORD)
    assert {t.name for t in methods.templates} == set(SHOWS)

    # --- the cards: six, each saying in a line what it does in libvirt terms ---
    page.get_by_role("link", name="New guest").click()
    cards = page.locator("a.template-card")
    expect(cards).to_have_count(6)
    lines = page.locator("a.template-card .libvirt").all_inner_texts()
    assert any("hd then cdrom" in line for line in lines), lines
    assert any("hd then network" in line for line in lines), lines
    assert any("createXML only" in line for line in lines), lines
    assert sum("defineXML + create" in line for line in lines) == 5, lines

    # --- one click each (the requests run side by side) ---
    asked: dict[str, int] = {}
    for template in methods.templates:
        name = new_name("vmportal-m-")
        methods.names.append(name)
        page.goto(f"{base}/")
        assert ask_for_guest(page, template.name, name).status == 302
        asked[template.name] = landed_on_request(page)

    # --- each reaches its final state ---
    for template_name, request_id in asked.items():
        page.goto(f"{base}/requests/{request_id}/")
        expect(page.locator("#request-state")).to_have_text("Running", timeout=INSTALL_MS)
        guest = Guest.objects.get(requests__pk=request_id)
        info = operations.get_info(methods.hv, str(guest.uuid))
        assert info.active, (template_name, info)
        assert info.persistent is PERSISTENT[template_name], template_name
        page.goto(f"{base}/guests/{guest.uuid}/")
        expect(page.locator("#guest-state")).to_have_text("Running")
        expect(page.locator("#guest-status")).to_contain_text(
            "persistent" if PERSISTENT[template_name] else "transient"
        )
        wait_for_text(page, SHOWS[template_name], timeout=INSTALL_MS)
