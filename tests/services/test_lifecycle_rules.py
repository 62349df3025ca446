"""The lifecycle guide's rules for transient and autodestroy guests, kept exactly (test driver).

The test driver has no AUTODESTROY flag: here autodestroy guests are rows that say so over
domains the test makes; tests/services/provision/test_autodestroy_qemu.py has the real flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User

from provisioning.hypervisor import operations, storage
from provisioning.models import Guest, GuestTemplate, Host, Job
from provisioning.services import actions, events, migrate
from provisioning.services.actions import ActionRefused, allowed_actions, guest_action
from tests.factories import make_guest, make_host
from tests.support.engine import (
    TEST_POOL,
    hv,
    import_template,
    info_of,
    make_base_volume,
    provision_running,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)

pytestmark = pytest.mark.usefixtures("tidy_libvirt")
K = Job.Kind


@pytest.fixture
def owner(make_user) -> User:
    return make_user("ann")


@pytest.fixture
def base_volume(test_host: Host) -> Iterator[str]:
    name = make_base_volume()
    yield name
    storage.delete_volume(hv(), TEST_POOL, name)


@pytest.fixture
def transient(test_host: Host, base_volume: str) -> GuestTemplate:
    return import_template(test_host, lifecycle="transient", base_volume=base_volume)


def run(guest: Guest, kind: str, **options: Any) -> Job:
    """Open the action's job and run it in this process (no worker takes it: none runs)."""
    guest.refresh_from_db()
    job = guest_action(guest=guest, kind=kind, by=guest.owner, **options)
    actions.run_job(job.pk)
    job.refresh_from_db()
    guest.refresh_from_db()
    return job


# --- autodestroy: no save, no managed save, no migration; the service says why -------------


def test_an_autodestroy_guest_is_offered_no_save_managed_save_or_make_persistent(
    owner: User, test_host: Host
) -> None:
    guest = make_guest(owner=owner, host=test_host, persistent=False, autodestroy=True)
    offered = set(allowed_actions(guest))
    assert {K.SHUTDOWN, K.FORCE_OFF, K.SUSPEND, K.DELETE} <= offered
    assert not offered & {K.SAVE, K.MANAGED_SAVE, K.MAKE_PERSISTENT}
    # The same transient guest without autodestroy may be saved and made persistent.
    plain = make_guest(owner=owner, host=test_host, persistent=False)
    assert {K.SAVE, K.MAKE_PERSISTENT} <= set(allowed_actions(plain))


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (K.SAVE, "its memory cannot be saved to a file"),
        (K.MANAGED_SAVE, "cannot be saved and restored by libvirt"),
        (K.MAKE_PERSISTENT, "cannot be given a persistent config"),
    ],
)
def test_the_service_refuses_what_autodestroy_forbids_with_the_reason(
    owner: User, test_host: Host, kind: str, why: str
) -> None:
    guest = make_guest(owner=owner, host=test_host, persistent=False, autodestroy=True)
    with pytest.raises(ActionRefused) as refused:
        guest_action(guest=guest, kind=kind, by=owner)
    assert "autodestroyed with the connection that started it" in str(refused.value)
    assert why in str(refused.value)
    assert not Job.objects.filter(guest=guest).exists()


def test_migration_refuses_an_autodestroy_guest_and_says_why(owner: User, test_host: Host) -> None:
    make_host("other", uri="test:///default", pool=None)
    guest = make_guest(owner=owner, host=test_host, persistent=False, autodestroy=True)
    with pytest.raises(migrate.MigrationRefused, match="autodestroyed with the connection"):
        migrate.migration_start(guest=guest, by=owner)
    assert not Job.objects.filter(guest=guest).exists()


def test_a_vanished_autodestroy_guest_is_recorded_as_destroyed_with_its_connection(
    stack, owner: User, transient: GuestTemplate
) -> None:
    request = provision_running(owner, transient, "rule-ad1", autodestroy=False)
    guest = request.guest
    # The test driver cannot start one with the flag; the row says it was, as a real one's does.
    Guest.objects.filter(pk=guest.pk).update(autodestroy=True)
    operations.destroy(
        hv(), str(guest.uuid)
    )  # what libvirt does when the worker's connection closes
    events.domain_changed(host=guest.host, uuid=str(guest.uuid))
    guest.refresh_from_db()
    assert (guest.state, guest.state_reason) == (Guest.State.UNDEFINED, events.AUTODESTROYED)
    # A reconcile pass keeps saying so.
    events.reconcile_host(guest.host)
    guest.refresh_from_db()
    assert guest.state_reason == events.AUTODESTROYED


def test_a_guest_without_autodestroy_that_vanished_keeps_libvirts_reason(
    stack, owner: User, transient: GuestTemplate
) -> None:
    guest = provision_running(owner, transient, "rule-ad2").guest
    operations.destroy(hv(), str(guest.uuid))
    events.domain_changed(host=guest.host, uuid=str(guest.uuid))
    guest.refresh_from_db()
    assert (guest.state, guest.state_reason) == (Guest.State.UNDEFINED, "not-found")


# --- make persistent: defineXML on the running transient guest ---------------------------------


def test_make_persistent_defines_the_running_transient_guest_which_then_survives_shutdown(
    stack, owner: User, transient: GuestTemplate
) -> None:
    guest = provision_running(owner, transient, "rule-mp1").guest
    assert K.MAKE_PERSISTENT in allowed_actions(guest)
    job = run(guest, K.MAKE_PERSISTENT)
    assert job.status == Job.Status.SUCCEEDED, job.error
    info = info_of(guest)
    assert info.persistent and info.state == "running", "it runs on, now with a config"
    assert guest.persistent and guest.state == Guest.State.RUNNING
    assert K.MAKE_PERSISTENT not in allowed_actions(guest)
    with pytest.raises(ActionRefused, match="persistent already"):
        guest_action(guest=guest, kind=K.MAKE_PERSISTENT, by=owner)
    assert run(guest, K.FORCE_OFF).status == Job.Status.SUCCEEDED
    assert guest.state == Guest.State.DEFINED, "stopped, not gone"
    assert info_of(guest).exists


def test_a_transient_guest_that_stops_is_gone(stack, owner: User, transient: GuestTemplate) -> None:
    guest = provision_running(owner, transient, "rule-mp2").guest
    assert run(guest, K.FORCE_OFF).status == Job.Status.SUCCEEDED
    assert guest.state == Guest.State.UNDEFINED and not info_of(guest).exists


# --- save and restore keep a transient guest transient ------------------------------------------


def test_a_saved_transient_guest_restores_as_transient(
    stack, owner: User, transient: GuestTemplate, settings, tmp_path
) -> None:
    settings.SAVE_DIR = tmp_path
    guest = provision_running(owner, transient, "rule-sv1").guest
    assert run(guest, K.SAVE).status == Job.Status.SUCCEEDED
    assert guest.state == Guest.State.SAVED
    assert K.RESTORE in allowed_actions(guest)
    assert run(guest, K.RESTORE).status == Job.Status.SUCCEEDED
    info = info_of(guest)
    assert info.state == "running" and not info.persistent
    assert guest.state == Guest.State.RUNNING and not guest.persistent
