"""Rows of the work no person started: a schedule's rebuild, and changes reconcile and the
listener find in libvirt, each under its own channel."""

from __future__ import annotations

from provisioning.hypervisor import operations
from provisioning.models import AuditEvent, Guest, GuestTemplate, Host
from provisioning.services import audit, events, schedules
from tests import conftest
from tests.factories import make_guest, make_user


def test_a_scheduled_rebuild_is_recorded_as_the_schedules(
    test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user()
    guest = make_guest(owner=owner, template=kernel_template, state=Guest.State.DEFINED)
    schedule = schedules.schedule_create(guest=guest, by=owner, every_minutes=60)
    AuditEvent.objects.all().delete()
    run = schedules.schedule_fire(schedule.pk)
    assert run is not None and run.job is not None
    row = AuditEvent.objects.get()
    assert (row.action, row.channel, row.result) == ("guest.rebuild", "schedule", "ok")
    assert row.object_id == str(guest.uuid)
    assert row.actor is None


def test_reconcile_records_a_guest_that_vanished_behind_the_portals_back(
    test_host: Host, kernel_template: GuestTemplate
) -> None:
    guest = make_guest(owner=make_user(), template=kernel_template, state=Guest.State.RUNNING)
    events.reconcile_host(test_host)
    row = AuditEvent.objects.get(action="guest.state")
    assert row.channel == "reconcile"
    assert row.changes == {"state": ["running", "undefined"]}
    assert row.object_id == str(guest.uuid)
    # Nothing more changed: a second pass writes no second row.
    events.reconcile_host(test_host)
    assert AuditEvent.objects.filter(action="guest.state").count() == 1


def test_the_listener_records_a_guest_stopped_from_outside(
    test_host: Host, kernel_template: GuestTemplate
) -> None:
    from tests.support.domains import domain_xml

    owner = make_user()
    guest = make_guest(owner=owner, template=kernel_template, state=Guest.State.RUNNING)
    # Defined and stopped in libvirt: as if someone shut it down (or virsh destroy) outside.
    operations.define(conftest.test_hv(), domain_xml(name=guest.name, uuid=str(guest.uuid)))
    with audit.acting(audit.Channel.LISTENER):
        events.domain_changed(host=test_host, uuid=str(guest.uuid))
    row = AuditEvent.objects.get(action="guest.state")
    assert row.channel == "listener"
    assert row.changes == {"state": ["running", "defined"]}
