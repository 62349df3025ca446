"""The guest page's snapshots: the list, taking one, the revert's confirmation, deleting."""

from __future__ import annotations

import datetime as dt

import pytest
from django.test import Client

from provisioning.models import Guest, Job, Snapshot
from tests.factories import make_guest, make_host, make_template, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def guest(user) -> Guest:
    return make_guest(
        owner=user, template=make_template(name="Tiny", host=make_host()), name="web1"
    )


def snapshot(guest: Guest, name: str, *, memory: bool = True) -> Snapshot:
    return Snapshot.objects.create(
        guest=guest,
        name=name,
        taken=dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC),
        state="running" if memory else "shutoff",
        memory=memory,
        size_bytes=3 * 1024 * 1024,
    )


def test_the_page_lists_snapshots_with_size_and_state_and_offers_to_take_one(
    user_client: Client, guest
) -> None:
    snapshot(guest, "warm")
    snapshot(guest, "cold", memory=False)

    body = user_client.get(f"/guests/{guest.uuid}/").content.decode()

    assert 'data-snapshot="warm"' in body and 'data-snapshot="cold"' in body
    assert "disks and memory" in body and "3.0\xa0MB" in body and "stopped" in body
    assert "Take snapshot (disks and memory)" in body  # it runs
    assert "(2 of 5)" in body
    # What a revert loses, before it is confirmed.
    assert "Everything written to web1&#x27;s disks since 2026-11-30 12:00:00 is lost" in body
    assert "it comes back stopped" in body and "it comes back running" in body


def test_taking_one_queues_a_job_with_its_name(user_client: Client, guest) -> None:
    answer = user_client.post(
        f"/guests/{guest.uuid}/snapshots", {"name": "pre-upgrade"}, follow=True
    )

    job = guest.jobs.get()
    assert (job.kind, job.data["name"]) == (Job.Kind.SNAPSHOT, "pre-upgrade")
    assert "Snapshot pre-upgrade queued." in answer.content.decode()


def test_a_bad_name_is_a_clear_message_not_a_job(user_client: Client, guest) -> None:
    answer = user_client.post(f"/guests/{guest.uuid}/snapshots", {"name": "no spaces"}, follow=True)

    assert answer.status_code == 200
    assert "1 to 50 letters" in answer.content.decode()
    assert not guest.jobs.exists()


def test_a_revert_needs_the_snapshots_name_typed(user_client: Client, guest) -> None:
    snapshot(guest, "warm")
    url = f"/guests/{guest.uuid}/snapshots/warm/revert"

    refused = user_client.post(url, {"confirm": "wrong"}, follow=True)
    assert "Type the snapshot&#x27;s name (warm) to confirm" in refused.content.decode()
    assert not guest.jobs.exists()

    user_client.post(url, {"confirm": "warm"})
    job = guest.jobs.get()
    assert (job.kind, job.data["name"]) == (Job.Kind.REVERT, "warm")


def test_deleting_one_queues_a_job(user_client: Client, guest) -> None:
    snapshot(guest, "old")

    user_client.post(f"/guests/{guest.uuid}/snapshots/old/delete")

    assert guest.jobs.get().kind == Job.Kind.SNAPSHOT_DELETE


def test_someone_elses_guest_or_an_unknown_snapshot_is_404(user_client: Client, guest) -> None:
    snapshot(guest, "mine")
    stranger = Client()
    stranger.force_login(make_user())

    assert stranger.post(f"/guests/{guest.uuid}/snapshots", {"name": "x"}).status_code == 404
    assert stranger.post(f"/guests/{guest.uuid}/snapshots/mine/delete").status_code == 404
    assert user_client.post(f"/guests/{guest.uuid}/snapshots/nope/delete").status_code == 404
    assert not guest.jobs.exists()


def test_an_autodestroy_guest_says_why_it_has_no_snapshots(user_client: Client, guest) -> None:
    Guest.objects.filter(pk=guest.pk).update(autodestroy=True, persistent=False)

    body = user_client.get(f"/guests/{guest.uuid}/").content.decode()

    assert 'id="snapshot-refusal"' in body and "autodestroyed" in body
    assert "Take snapshot" not in body


def test_the_schedule_form_adds_a_snapshot_schedule_with_its_retention(
    user_client: Client, guest
) -> None:
    answer = user_client.post(
        f"/guests/{guest.uuid}/schedules",
        {"action": "snapshot", "keep": "3", "every_minutes": "1440"},
        follow=True,
    )

    schedule = guest.schedules.get()
    assert (schedule.action, schedule.keep) == ("snapshot", 3)
    body = answer.content.decode()
    assert "Schedule added." in body
    assert 'data-schedule-action="snapshot"' in body and "the newest 3" in body


def test_a_snapshot_schedule_keeping_too_many_is_refused_with_the_bound(
    user_client: Client, guest
) -> None:
    answer = user_client.post(
        f"/guests/{guest.uuid}/schedules",
        {"action": "snapshot", "keep": "9", "every_minutes": "60"},
        follow=True,
    )

    assert "Keep 1 to 4 snapshots" in answer.content.decode()
    assert not guest.schedules.exists()
