"""Reconcile: the periodic pass that makes the rows true to libvirt when events were missed.

No listener runs in these tests, so nothing but reconcile can notice what happens to a guest behind
the portal's back. One test drives it through real beat and worker processes; the others call
`reconcile_host` directly, as the worker's task does.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from lxml import etree

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import Hypervisor
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services import actions, events, provision, transitions
from tests.support.engine import (
    hv,
    info_of,
    new_log,
    provision_running,
    start_proc,
    status_of,
    submit,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.usefixtures("tidy_libvirt"), pytest.mark.timeout(120)]
Status = ProvisioningRequest.Status


def row(guest: Guest) -> Guest:
    """The guest's row as the database has it now."""
    guest.refresh_from_db()
    return guest


def shutdown_job(guest: Guest, *, deadline_in: float, **data: Any) -> Job:
    """A running shutdown job waiting for the guest to power off, as run_job leaves it."""
    job = transitions.job_open(kind=Job.Kind.SHUTDOWN, guest=guest, data=data)
    transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    deadline = timezone.now() + timedelta(seconds=deadline_in)
    Job.objects.filter(pk=job.pk).update(deadline=deadline)
    job.refresh_from_db()
    return job


def outside_domain_xml(name: str, uuid: str) -> str:
    """A small domain for the test driver, as someone using virsh might define it."""
    root = etree.Element("domain", type="test")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = "64"
    etree.SubElement(root, "vcpu").text = "1"
    os_ = etree.SubElement(root, "os")
    etree.SubElement(os_, "type").text = "hvm"
    return etree.tostring(root, encoding="unicode")


@pytest.fixture
def outside_domain(test_host: Host) -> Iterator[DomainInfo]:
    """A running domain on the test host that the portal did not make."""
    uuid = str(uuidlib.uuid4())
    name = f"outside-{uuid[:8]}"
    operations.define(hv(), outside_domain_xml(name, uuid))
    info = operations.start(hv(), uuid)
    yield info
    operations.destroy(hv(), uuid)
    operations.undefine(hv(), uuid)


class CountingListDomains:
    """Wraps operations.list_domains to count the calls (measuring, not faking)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = operations.list_domains
        monkeypatch.setattr(operations, "list_domains", self)

    def __call__(self, hv: Hypervisor) -> list[DomainInfo]:
        self.calls += 1
        return self._real(hv)


def queued_tasks(queue: str) -> list[str]:
    """Names of the tasks waiting in a Celery queue on this test's Redis."""
    conn = redis.Redis.from_url(settings.REDIS_URL)
    return [json.loads(m)["headers"]["task"] for m in conn.lrange(queue, 0, -1)]


# --- through beat and a worker ----------------------------------------------------------------


def test_beat_and_a_worker_repair_a_guest_suspended_behind_the_portals_back(
    stack: Any, make_user: Any, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "rec-suspended").guest
    assert guest.state == Guest.State.RUNNING
    operations.suspend(hv(), str(guest.uuid))  # no listener runs: only reconcile can notice
    stack.env["VMPORTAL_RECONCILE_EVERY"] = "1"
    worker = start_proc(stack, "worker", "reconcile-worker")
    start_proc(stack, "beat", "reconcile-beat")

    def says(state: str) -> bool:
        return row(guest).state == state

    try:
        wait_until(lambda: says(Guest.State.PAUSED), timeout=30, what="the row to say paused")
        operations.resume(hv(), str(guest.uuid))
        wait_until(lambda: says(Guest.State.RUNNING), timeout=30, what="the row to say running")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{new_log(worker)[-3000:]}") from None
    assert guest.state_reason == info_of(guest).reason == "unpaused"
    assert "provisioning.reconcile_host" in new_log(worker)


# --- one pass, called directly ----------------------------------------------------------------


def test_a_guest_undefined_behind_the_portals_back_becomes_undefined(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "rec-vanished").guest
    operations.destroy(hv(), str(guest.uuid))
    operations.undefine(hv(), str(guest.uuid))
    assert row(guest).state == Guest.State.RUNNING  # nobody told the portal

    events.reconcile_host(test_host)

    assert row(guest).state == Guest.State.UNDEFINED
    assert not guest.persistent
    test_host.refresh_from_db()
    assert str(guest.uuid) not in {d["uuid"] for d in test_host.unmanaged_domains}


def test_a_domain_made_outside_the_portal_is_listed_as_unmanaged(
    stack: Any,
    make_user: Any,
    test_host: Host,
    kernel_template: GuestTemplate,
    outside_domain: DomainInfo,
) -> None:
    ours = provision_running(make_user("ann"), kernel_template, "rec-ours").guest

    events.reconcile_host(test_host)

    test_host.refresh_from_db()
    found = {d["uuid"]: d for d in test_host.unmanaged_domains}
    assert found[outside_domain.uuid] == {
        "uuid": outside_domain.uuid,
        "name": outside_domain.name,
        "state": "running",
        "vcpus": 1,
        "memory_mib": 64,
    }
    assert str(ours.uuid) not in found
    assert not Guest.objects.filter(uuid=outside_domain.uuid).exists()  # listed, not adopted

    # Gone from libvirt: gone from the list at the next pass.
    operations.destroy(hv(), outside_domain.uuid)
    operations.undefine(hv(), outside_domain.uuid)
    events.reconcile_host(test_host)
    test_host.refresh_from_db()
    assert outside_domain.uuid not in {d["uuid"] for d in test_host.unmanaged_domains}


def test_a_shutdown_job_stuck_past_its_deadline_fails(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    # The guest ignores the ACPI button: it never powers off.
    guest = provision_running(make_user("ann"), kernel_template, "rec-stuck").guest
    job = shutdown_job(guest, deadline_in=60)

    events.reconcile_host(test_host)
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING  # still within its deadline

    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    events.reconcile_host(test_host)

    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert job.error == "the guest did not shut down before the deadline"
    assert job.completed is not None
    assert info_of(guest).active and row(guest).state == Guest.State.RUNNING


def test_a_forced_shutdown_job_past_its_deadline_forces_the_guest_off(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "rec-force").guest
    job = shutdown_job(guest, deadline_in=-1, force=True)

    events.reconcile_host(test_host)

    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert "Graceful shutdown timed out; forced off" in [e.message for e in job.events.all()]
    info = info_of(guest)
    assert not info.active and info.reason == "destroyed"
    assert row(guest).state == Guest.State.DEFINED


def test_an_install_past_its_deadline_fails_and_is_removed(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    request = submit(make_user("ann"), kernel_template, "rec-late")
    provision.advance(request.pk)
    assert status_of(request) == Status.WAITING
    ProvisioningRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1)
    )

    events.reconcile_host(test_host)

    assert status_of(request) == Status.FAILED
    assert request.error == "the installer did not finish before the deadline"
    assert not info_of(request.guest).exists
    assert row(request.guest).state == Guest.State.UNDEFINED
    job = Job.objects.get(request=request)
    assert job.status == Job.Status.FAILED and job.error == request.error


def test_a_guest_being_rebuilt_is_left_to_its_request(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann")
    guest = provision_running(owner, kernel_template, "rec-rebuild").guest
    rebuild = provision.rebuild_submit(guest=guest, by=owner)
    provision.advance(rebuild.pk)  # asks the guest to shut down, then waits for it
    assert status_of(rebuild) == Status.PREPARING
    assert not info_of(guest).active

    events.reconcile_host(test_host)

    # A rebuild is not a power-off: the row keeps its state until the request records the end.
    assert row(guest).state == Guest.State.RUNNING
    assert status_of(rebuild) == Status.PREPARING


def test_a_queued_rebuild_whose_message_was_lost_is_queued_again_as_a_request_step(
    stack: Any, make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann")
    guest = provision_running(owner, kernel_template, "rec-lost").guest
    rebuild = provision.rebuild_submit(guest=guest, by=owner)
    conn = redis.Redis.from_url(settings.REDIS_URL)
    conn.delete(test_host.queue)  # no worker ran: the message is lost
    long_ago = timezone.now() - timedelta(seconds=settings.STALE_STEP_SECONDS + 5)
    ProvisioningRequest.objects.filter(pk=rebuild.pk).update(updated=long_ago)
    Job.objects.filter(request=rebuild).update(created=long_ago)

    events.reconcile_host(test_host)

    # The request's step runs again; the job is not handed to the lifecycle-action runner,
    # which has no action for a rebuild.
    assert queued_tasks(test_host.queue) == ["provisioning.advance_request"]
    assert Job.objects.get(request=rebuild).status == Job.Status.QUEUED


# --- one call to libvirt per host ---------------------------------------------------------------


def test_a_pass_lists_the_hosts_domains_once_and_repairs_everything_from_that_list(
    stack: Any,
    make_user: Any,
    test_host: Host,
    kernel_template: GuestTemplate,
    outside_domain: DomainInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = make_user("ann")
    paused = provision_running(owner, kernel_template, "rec-one-paused").guest
    vanished = provision_running(owner, kernel_template, "rec-one-vanished").guest
    stuck = provision_running(owner, kernel_template, "rec-one-stuck").guest
    steady = provision_running(owner, kernel_template, "rec-one-steady").guest
    waiting = submit(owner, kernel_template, "rec-one-waiting")
    provision.advance(waiting.pk)
    assert status_of(waiting) == Status.WAITING
    operations.suspend(hv(), str(paused.uuid))
    operations.destroy(hv(), str(vanished.uuid))
    operations.undefine(hv(), str(vanished.uuid))
    job = shutdown_job(stuck, deadline_in=-1)
    counter = CountingListDomains(monkeypatch)

    events.reconcile_host(test_host)

    assert counter.calls == 1
    assert row(paused).state == Guest.State.PAUSED
    assert row(vanished).state == Guest.State.UNDEFINED
    assert row(steady).state == Guest.State.RUNNING
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert status_of(waiting) == Status.WAITING  # its installer still runs
    test_host.refresh_from_db()
    assert outside_domain.uuid in {d["uuid"] for d in test_host.unmanaged_domains}
    assert info_of(paused).state == GuestState.PAUSED  # reconcile only records, never acts

    events.reconcile_host(test_host)
    assert counter.calls == 2


# --- events while a job runs ---------------------------------------------------------------------


def test_an_event_while_a_job_runs_leaves_the_row_to_the_job(
    make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "ev-job").guest
    job = transitions.job_open(kind=Job.Kind.RESTORE, guest=guest)
    transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    # A restore is paused while it loads: an event read then must not land after the job's end.
    operations.suspend(hv(), str(guest.uuid))

    events.domain_changed(host=test_host, uuid=str(guest.uuid))
    assert row(guest).state == Guest.State.RUNNING

    transitions.job_move(job.pk, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)
    events.domain_changed(host=test_host, uuid=str(guest.uuid))
    assert row(guest).state == Guest.State.PAUSED  # with no job, events apply again


def run_action(guest: Guest, kind: str) -> None:
    """A user's lifecycle job on the guest, run to its end as a worker runs it."""
    job = actions.guest_action(guest=row(guest), kind=kind, by=guest.owner)
    actions.run_job(job.pk)
    assert Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED


def test_an_event_read_before_a_suspend_landed_does_not_undo_it(
    make_user: Any, test_host: Host, kernel_template: GuestTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the bench: the listener read the row (paused), then libvirt (running: a resume had
    # just run), and a suspend succeeded before its write, which put "running" back on the row.
    # Here the jobs run inside the listener's read of libvirt, where a slow listener met them.
    guest = provision_running(make_user("ann"), kernel_template, "ev-late").guest
    run_action(guest, "suspend")
    real = operations.get_info

    def read_between_two_jobs(hv: Hypervisor, uuid: str) -> DomainInfo:
        run_action(guest, "resume")
        info = real(hv, uuid)
        run_action(guest, "suspend")
        return info

    monkeypatch.setattr(operations, "get_info", read_between_two_jobs)
    events.domain_changed(host=test_host, uuid=str(guest.uuid))
    monkeypatch.undo()
    assert info_of(guest).state == GuestState.PAUSED
    assert row(guest).state == Guest.State.PAUSED  # the suspend's state stands
    events.domain_changed(host=test_host, uuid=str(guest.uuid))  # a timely event agrees
    assert row(guest).state == Guest.State.PAUSED


def test_a_reconcile_pass_that_listed_the_domains_before_a_suspend_does_not_undo_it(
    make_user: Any, test_host: Host, kernel_template: GuestTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "rec-late").guest
    real = operations.list_domains

    def list_then_a_suspend(hv: Hypervisor) -> list[DomainInfo]:
        domains = real(hv)
        run_action(guest, "suspend")
        return domains

    monkeypatch.setattr(operations, "list_domains", list_then_a_suspend)
    events.reconcile_host(test_host)
    assert row(guest).state == Guest.State.PAUSED
    monkeypatch.undo()
    operations.resume(hv(), str(guest.uuid))  # behind the portal's back: the next pass sees it
    events.reconcile_host(test_host)
    assert row(guest).state == Guest.State.RUNNING


def test_a_shutdown_job_still_hears_the_guest_stop(
    make_user: Any, test_host: Host, kernel_template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), kernel_template, "ev-shut").guest
    job = shutdown_job(guest, deadline_in=60)
    operations.shutdown(hv(), str(guest.uuid))  # the test driver powers off at once

    events.domain_changed(host=test_host, uuid=str(guest.uuid))
    assert row(guest).state == Guest.State.DEFINED
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
