"""Self-service flows in a real browser against the real processes, on libvirt's test driver."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Guest, GuestTemplate, Job, ProvisioningRequest
from tests.factories import PASSWORD, make_guest
from tests.support.browser import log_in
from tests.support.flows import (
    Watch,
    ask_for_guest,
    landed_on_request,
    listener_connected,
    new_name,
    watch,
)
from tests.support.libvirt import TEST_POOL, TEST_URI
from tests.support.stack import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

Status = ProvisioningRequest.Status
ORDER = [s.label for s in Status]  # the statuses in the order a request passes them


def ask_and_wait_for_the_installer(
    page: Page, seen: Watch, template: GuestTemplate
) -> tuple[ProvisioningRequest, str]:
    """Ask for a guest through the browser and wait on its request page for the installer."""
    name = new_name("web-")
    posted = ask_for_guest(page, template.name, name)
    assert posted.status == 302, page.locator(".error").all_inner_texts()
    request_id = landed_on_request(page)
    expect(page.get_by_text(f"Requested {name}.")).to_be_visible()
    expect(page.locator("#request-state")).to_have_text("Waiting for the installer", timeout=30_000)
    # The page listens to this request's own event stream.
    assert seen.stream_responses(f"/requests/{request_id}/events") == [200]
    assert seen.sse_opened() == 1
    request = ProvisioningRequest.objects.select_related("guest").get(pk=request_id)
    assert request.guest is not None
    return request, name


def test_a_user_asks_for_a_guest_and_watches_it_reach_running_without_reloading(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    make_user("ann")
    stack.start("web", "worker", "listener")
    # With the page's polling refused, only the event stream can move the status on.
    seen = watch(page, block_request_polling=True)
    log_in(page, stack.base_url, "ann", PASSWORD)
    expect(page.get_by_role("heading", name="My guests")).to_be_visible()
    request, name = ask_and_wait_for_the_installer(page, seen, kernel_template)
    guest = request.guest
    assert guest is not None
    loads = seen.mark()

    wait_until(listener_connected, timeout=30, what="the listener to subscribe to libvirt")
    # The test driver applies <on_poweroff> at once: this plays "the installer finished".
    operations.shutdown(get_hypervisor(TEST_URI), str(guest.uuid))

    with seen.explaining():
        expect(page.locator("#request-state")).to_have_text("Running", timeout=30_000)
    expect(page.get_by_role("link", name=f"Open {name}")).to_be_visible()
    seen.assert_not_reloaded(loads)
    streamed = seen.streamed_statuses()
    assert streamed[-1] == "Running"
    assert streamed.index("Waiting for the installer") < streamed.index("Running")
    assert streamed == sorted(streamed, key=ORDER.index), streamed
    assert seen.stream_responses(f"/requests/{request.pk}/events") == [200]
    request.refresh_from_db()
    guest.refresh_from_db()
    assert request.status == Status.RUNNING
    assert guest.state == Guest.State.RUNNING

    page.get_by_role("link", name=f"Open {name}").click()
    expect(page.locator("#guest-state")).to_have_text("Running")
    expect(page.locator('[data-action="suspend"]')).to_be_visible()


def test_a_user_cancels_a_provisioning_from_its_page_and_nothing_is_left(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    make_user("ann")
    stack.start("web", "worker", "listener")
    seen = watch(page)
    log_in(page, stack.base_url, "ann", PASSWORD)
    request, name = ask_and_wait_for_the_installer(page, seen, kernel_template)
    hv = get_hypervisor(TEST_URI)
    assert operations.find_by_name(hv, name) is not None

    page.get_by_role("button", name="Cancel").click()

    expect(page.locator("#request-state")).to_have_text("Cancelled")
    expect(page.get_by_text(f"Cancelled {name}.")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    wait_until(
        lambda: operations.find_by_name(hv, name) is None, timeout=30, what="the domain to go"
    )
    wait_until(
        lambda: not [v for v in storage.list_volumes(hv, TEST_POOL) if v.name.startswith(name)],
        timeout=30,
        what="the disk volume to go",
    )
    job = Job.objects.get(request=request)
    wait_until(
        lambda: Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED,
        timeout=30,
        what="the provisioning job to be cancelled",
    )
    request.refresh_from_db()
    assert request.status == Status.CANCELLED
    # The listener applies the destroy and undefine events after the cleanup: wait for the last.
    wait_until(
        lambda: Guest.objects.get(name=name).state == Guest.State.UNDEFINED,
        timeout=30,
        what="the guest row to say undefined",
    )


def test_another_user_neither_lists_nor_opens_my_guest(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    ann = make_user("ann")
    make_user("bob")
    guest = make_guest(owner=ann, template=kernel_template, name="ann-web")
    request = ProvisioningRequest.objects.create(
        owner=ann,
        template=kernel_template,
        template_version=kernel_template.version,
        host=guest.host,
        guest=guest,
        name=guest.name,
        vcpus=1,
        memory_mib=256,
        disk_mib=64,
        status=Status.RUNNING,
    )
    stack.start("web")
    log_in(page, stack.base_url, "ann", PASSWORD)
    expect(page.locator(f"#guest-{guest.uuid}")).to_contain_text("ann-web")  # the owner sees it
    page.get_by_role("button", name="Log out").click()

    log_in(page, stack.base_url, "bob", PASSWORD)
    expect(page.get_by_role("heading", name="My guests")).to_be_visible()
    expect(page.get_by_text("You have no guests yet.")).to_be_visible()
    expect(page.get_by_text("ann-web")).to_have_count(0)
    page.get_by_label("Search guests").fill("ann")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_text("No guest matches.")).to_be_visible()

    for url in (f"/guests/{guest.uuid}/", f"/requests/{request.pk}/"):
        response = page.goto(f"{stack.base_url}{url}")
        assert response is not None and response.status == 404
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
        expect(page.get_by_text("ann-web")).to_have_count(0)
    for url in (f"/guests/{guest.uuid}/events", f"/requests/{request.pk}/events"):
        assert page.request.get(f"{stack.base_url}{url}").status == 404


def test_bad_input_gets_errors_next_to_the_fields_and_makes_nothing(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    make_user("ann")
    stack.start("web")
    log_in(page, stack.base_url, "ann", PASSWORD)

    posted = ask_for_guest(page, kernel_template.name, "my guest", memory_mib="99999")

    assert posted.status == 400
    name_field = page.locator(".field", has=page.locator("#id_name"))
    memory_field = page.locator(".field", has=page.locator("#id_memory_mib"))
    expect(name_field.locator(".field-error")).to_have_text(
        "Use 1-63 letters, digits, dots, dashes or underscores, starting with a letter or digit."
    )
    expect(memory_field.locator(".field-error")).to_have_text("Pick between 128 and 4096 MiB.")
    expect(page.locator(".field-error")).to_have_count(2)
    expect(page.locator("#id_name")).to_have_value("my guest")
    expect(page.locator("#id_memory_mib")).to_have_value("99999")
    assert not ProvisioningRequest.objects.exists()
    assert not Guest.objects.exists()

    # The same form, corrected, goes through.
    page.locator("#id_name").fill("my-guest")
    page.locator("#id_memory_mib").fill("512")
    page.get_by_role("button", name="Create guest").click()
    landed_on_request(page)
    made = ProvisioningRequest.objects.get()
    assert (made.name, made.memory_mib, made.owner.username) == ("my-guest", 512, "ann")


def test_staff_see_everyones_guests_and_filter_them_by_owner(
    stack, make_user, kernel_template: GuestTemplate, page: Page
) -> None:
    ann, bob = make_user("ann"), make_user("bob")
    make_user("root-admin", staff=True)
    make_guest(owner=ann, template=kernel_template, name="ann-web")
    make_guest(owner=bob, template=kernel_template, name="bob-db")
    stack.start("web")
    log_in(page, stack.base_url, "root-admin", PASSWORD)
    expect(page.get_by_role("heading", name="All guests")).to_be_visible()
    rows = page.locator("table.guests tbody tr")
    expect(rows).to_have_count(2)
    expect(page.get_by_role("row", name=re.compile("ann-web"))).to_contain_text("ann")
    expect(page.get_by_role("row", name=re.compile("bob-db"))).to_contain_text("bob")

    for owner, shown in (("ann", "ann-web"), ("bob", "bob-db")):
        page.get_by_label("Owner").select_option(owner)
        page.get_by_role("button", name="Search").click()
        expect(page).to_have_url(re.compile(rf"[?&]owner={owner}(&|$)"))
        expect(rows).to_have_count(1)
        expect(rows).to_contain_text(shown)

    page.get_by_label("Owner").select_option("")
    page.get_by_role("button", name="Search").click()
    expect(rows).to_have_count(2)
    page.locator("table.guests").get_by_role("link", name="ann-web").click()
    expect(page.get_by_text("owned by ann")).to_be_visible()
