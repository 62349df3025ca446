"""The audit log's origin, its lazily found user, and the daily prune of old rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from provisioning import queue, tasks
from provisioning.models import AuditEvent, IdempotencyKey
from provisioning.services import audit
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _aged(event: AuditEvent, days: float) -> AuditEvent:
    # created is auto_now_add: only an UPDATE can make a row old.
    AuditEvent.objects.filter(pk=event.pk).update(created=timezone.now() - timedelta(days=days))
    return event


# --- the origin ---


def test_a_lazy_user_is_not_looked_up_until_a_row_is_recorded() -> None:
    alice = make_user("alice")
    asked: list[int] = []

    def find() -> object:
        asked.append(1)
        return alice

    with audit.acting(audit.Channel.WEB, user=find, ip="192.0.2.7"):
        assert asked == []
        event = audit.record("thing.do")
        audit.record("thing.again")
    assert len(asked) == 2  # each row asks; the request's lazy user caches itself
    assert (event.actor, event.actor_name, event.channel) == (alice, "alice", "web")
    assert event.source_ip == "192.0.2.7"


def test_a_lazy_anonymous_user_records_no_actor() -> None:
    with audit.acting(audit.Channel.WEB, user=lambda: AnonymousUser(), ip="::1"):
        event = audit.record("login_failed", result=audit.Result.REFUSED)
    assert event.actor is None and event.actor_name == ""
    assert event.source_ip == "::1"


def test_by_names_the_actor_over_the_origins_user() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    with audit.acting(audit.Channel.ADMIN, user=lambda: alice):
        event = audit.record("thing.do", by=bob)
    assert (event.actor, event.channel) == (bob, "admin")


def test_the_origin_is_gone_after_the_block() -> None:
    with audit.acting(audit.Channel.WEB, user=lambda: None, ip="192.0.2.1"):
        pass
    assert audit.origin().ip is None
    assert audit.origin().channel != audit.Channel.WEB


# --- retention ---


def test_prune_removes_rows_past_the_retention_and_keeps_the_rest() -> None:
    old = _aged(audit.record("thing.old"), days=400)
    edge = _aged(audit.record("thing.edge"), days=364)
    new = audit.record("thing.new")
    assert audit.prune(days=365) == 1
    assert set(AuditEvent.objects.values_list("pk", flat=True)) == {edge.pk, new.pk}
    assert not AuditEvent.objects.filter(pk=old.pk).exists()


def test_prune_removes_idempotency_keys_past_their_hours() -> None:
    alice = make_user("alice")
    old = IdempotencyKey.objects.create(user=alice, key="old", fingerprint="0" * 64)
    IdempotencyKey.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(hours=25))
    new = IdempotencyKey.objects.create(user=alice, key="new", fingerprint="0" * 64)
    assert audit.prune_idempotency_keys(hours=24) == 1
    assert list(IdempotencyKey.objects.values_list("pk", flat=True)) == [new.pk]


def test_the_prune_task_uses_the_settings(settings) -> None:
    settings.AUDIT_RETENTION_DAYS = 30
    settings.API_IDEMPOTENCY_HOURS = 1
    alice = make_user("alice")
    _aged(audit.record("thing.old"), days=31)
    kept = _aged(audit.record("thing.recent"), days=29)
    key = IdempotencyKey.objects.create(user=alice, key="k", fingerprint="0" * 64)
    IdempotencyKey.objects.filter(pk=key.pk).update(created=timezone.now() - timedelta(hours=2))
    assert tasks.prune_audit() == {"audit_events": 1, "idempotency_keys": 1}
    assert list(AuditEvent.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not IdempotencyKey.objects.exists()


def test_beat_runs_the_prune_task_daily_by_its_queued_name() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["prune-audit"]
    assert entry["task"] == queue.PRUNE_AUDIT == tasks.prune_audit.name
    assert queue.PRUNE_AUDIT in queue.NAMES
    schedule = entry["schedule"]
    assert schedule.hour == {3} and schedule.minute == {17}
    assert schedule.day_of_week == set(range(7))
