"""Snapshots in Chromium on libvirt's test driver, through the real web server and worker: take
one, see what a revert would lose, revert to it, delete it."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from provisioning.hypervisor import operations
from provisioning.hypervisor import snapshots as hvsnapshots
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Guest, GuestTemplate, Job
from tests.factories import PASSWORD
from tests.support.browser import log_in
from tests.support.engine import provision_running
from tests.support.stack import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]


def open_guest_page(stack, make_user, template: GuestTemplate, page: Page, name: str) -> Guest:
    """Sam's running guest on the test driver, its page open in Chromium over the real stack."""
    owner = make_user("sam")
    guest = provision_running(owner, template, name).guest
    stack.start("web", "worker", "listener")
    log_in(page, stack.base_url, "sam", PASSWORD)
    page.goto(f"{stack.base_url}/guests/{guest.uuid}/")
    return guest


def test_a_user_takes_reverts_and_deletes_a_snapshot_from_the_guest_page(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    guest = open_guest_page(stack, make_user, kernel_template, page, "snappy")
    hv = get_hypervisor(guest.host.uri)
    expect(page.locator("#guest-snapshots")).to_contain_text("No snapshots.")

    page.locator("#snapshot-name").fill("pre-change")
    page.get_by_role("button", name="Take snapshot (disks and memory)").click()
    row = page.locator('tr[data-snapshot="pre-change"]')
    expect(row).to_be_visible(timeout=30_000)  # the stream redraws it once the job is done
    expect(row).to_contain_text("disks and memory")
    assert [s.name for s in hvsnapshots.list_snapshots(hv, str(guest.uuid))] == ["pre-change"]

    # The guest stops; reverting brings it back running, as it was taken.
    operations.destroy(hv, str(guest.uuid))
    expect(page.locator("#guest-state")).to_have_text("Stopped", timeout=30_000)
    row.get_by_text("Revert…").click()
    expect(row.locator(".warn")).to_contain_text("is lost, and its memory now")
    row.get_by_label("Type pre-change to confirm").fill("pre-change")
    row.get_by_role("button", name="Revert to pre-change").click()
    expect(page.locator("#guest-state")).to_have_text("Running", timeout=30_000)
    revert = wait_until(
        lambda: Job.objects.filter(guest=guest, kind=Job.Kind.REVERT, status="succeeded").first(),
        timeout=30,
        what="the revert job to succeed",
    )
    assert revert.data == {"name": "pre-change"}

    page.locator('tr[data-snapshot="pre-change"]').get_by_role("button", name="Delete").click()
    expect(page.locator("#guest-snapshots")).to_contain_text("No snapshots.", timeout=30_000)
    assert hvsnapshots.list_snapshots(hv, str(guest.uuid)) == []


def test_what_a_user_types_survives_the_stream_redrawing_the_page(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    guest = open_guest_page(stack, make_user, kernel_template, page, "typed")
    hv = get_hypervisor(guest.host.uri)
    expect(page.locator("#guest-state")).to_have_text("Running")

    page.locator("#snapshot-name").fill("before-upgrade")
    page.locator("#snapshot-description").fill("kernel 6.1")
    page.get_by_text("Delete…").click()
    page.get_by_label("Type typed to confirm").fill("typ")
    # The guest is paused behind the page's back: the stream redraws the whole status part.
    operations.suspend(hv, str(guest.uuid))
    expect(page.locator("#guest-state")).to_have_text("Paused", timeout=30_000)
    expect(page.locator("#snapshot-name")).to_have_value("before-upgrade")
    expect(page.locator("#snapshot-description")).to_have_value("kernel 6.1")
    expect(page.locator("details.delete")).to_have_attribute("open", "")
    expect(page.get_by_label("Type typed to confirm")).to_have_value("typ")

    # What was sent is spent: the redraw after the job leaves an empty form.
    page.get_by_role("button", name="Take snapshot (disks and memory)").click()
    expect(page.locator('tr[data-snapshot="before-upgrade"]')).to_be_visible(timeout=30_000)
    expect(page.locator("#snapshot-name")).to_have_value("")
    expect(page.get_by_label("Type typed to confirm")).to_have_value("typ")
