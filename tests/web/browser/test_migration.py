"""A staff user moves a running guest from host a to host b from its page, watching it go; the
guest's serial terminal, open on the page, moves with it.

Two real libvirt daemons (tests/support/multihost.py), a worker and a listener per host, and the
web server. After the Migrate form's post the page stays put: the job's progress, the end of the
job and the guest's new host all arrive through the guest page's event stream.
"""

# ruff: noqa: F811 - the test takes the fixtures imported below as arguments

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from provisioning.hypervisor import operations
from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, Job
from tests.factories import PASSWORD
from tests.support.browser import log_in
from tests.support.flows import watch
from tests.support.hosts import second_libvirtd  # noqa: F401 - fixture
from tests.support.multihost import (
    MIGRATION_TIMEOUT,
    HostStack,
    QemuHosts,
    alive_after,
    host_stack,  # noqa: F401 - fixture
    provision_on_a,
    qemu_hosts,  # noqa: F401 - fixture
    uptimes,
    wait_listening,
)
from tests.support.terminal import run_in_terminal, terminal_state

pytestmark = [pytest.mark.browser, pytest.mark.qemu, pytest.mark.timeout(300)]

# Every text #job-progress shows, as it changes (set up once the page has loaded).
RECORD_PROGRESS_JS = """
() => {
  window.__progress = [];
  const look = () => {
    const el = document.querySelector('#job-progress');
    const text = el ? el.textContent.trim() : null;
    const seen = window.__progress;
    if (text !== null && seen[seen.length - 1] !== text) { seen.push(text); }
  };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true,
                                                     characterData: true});
  look();
}
"""


def test_a_staff_user_migrates_a_running_guest_from_its_page_and_watches_it_move(
    qemu_hosts: QemuHosts,
    host_stack: HostStack,
    staff: User,
    page: Page,
) -> None:
    hosts = qemu_hosts
    for host in (hosts.a, hosts.b):
        host_stack.worker(host)
        host_stack.listener(host)
    base = host_stack.web()
    wait_listening(hosts.a, hosts.b)
    guest = provision_on_a(hosts, host_stack, staff)
    uuid = str(guest.uuid)
    before = uptimes(hosts.console(hosts.a, uuid))[-1]
    # A cap on the guest's migration speed (libvirt's, for its next migration): some seconds of
    # progress to watch, where a tiny idle guest would otherwise move in one or two polls.
    hosts.hv_a.call(lambda conn: conn.lookupByUUIDString(uuid).migrateSetMaxSpeed(16, 0))

    seen = watch(page)
    log_in(page, base, staff.username, PASSWORD)
    page.goto(f"{base}/guests/{uuid}/")
    expect(page.locator("#guest-host")).to_have_text("a")
    expect(page.locator("#guest-state")).to_have_text("Running")
    # The serial terminal is open on host a's console before the move.
    terminal_state(page, "running")
    run_in_terminal(page, "echo $((6*7))", "42")
    page.get_by_label("Destination host").select_option(label="b")
    page.locator('[data-action="migrate"]').click()

    # The post answers with the guest page again; from here on nothing reloads it.
    expect(page.locator(".messages")).to_contain_text("Migration queued (live).")
    loads = seen.mark()
    page.wait_for_function("window.__flow.sseOpen >= 1")
    page.evaluate(RECORD_PROGRESS_JS)
    with seen.explaining():
        expect(page.locator("#guest-host")).to_have_text("b", timeout=MIGRATION_TIMEOUT * 1000)
        expect(page.locator("#guest-state")).to_have_text("Running")
        expect(page.locator("#job-progress")).to_have_count(0)  # the job is over
        expect(page.locator('[data-action="migrate"]')).to_be_visible()  # offered again

    # The terminal followed the guest to host b by itself, and its shell still answers.
    terminal_state(page, "running", timeout=MIGRATION_TIMEOUT * 1000)
    run_in_terminal(page, "echo $((8*8))", "64")
    seen.assert_not_reloaded(loads)
    shown = page.evaluate("window.__progress")
    print(f"PROGRESS shown on the page: {shown}")
    percents = [int(m.group(1)) for t in shown if (m := re.fullmatch(r"(\d+)%", t))]
    assert len(set(percents)) >= 2, shown
    assert any(0 < p < 100 for p in percents), shown
    assert percents == sorted(percents), shown
    job = Job.objects.get(guest=guest, kind=Job.Kind.MIGRATE)
    assert job.status == Job.Status.SUCCEEDED
    assert job.created_by == staff
    guest.refresh_from_db()
    assert (guest.host, guest.state) == (hosts.b, Guest.State.RUNNING)
    assert operations.get_info(hosts.hv_b, uuid).state == GuestState.RUNNING
    assert not operations.get_info(hosts.hv_a, uuid).exists
    alive_after(hosts, hosts.b, guest, before)
