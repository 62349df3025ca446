"""The API tests' world: three people, their tokens, and one of each thing alice owns.

Rows only (the `db` fixture): nothing here starts a process or touches libvirt; work queued on
commit is never sent, so a 202 leaves its job queued for the test to look at.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from provisioning.models import (
    ApiToken,
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    RebuildSchedule,
    SshKey,
)
from provisioning.services import audit, provision, schedules, tokens
from tests import factories

PROBLEM = "application/problem+json"
API = "/api/v1"


@dataclass
class World:
    """alice owns one of everything; bob owns nothing of hers; root-admin is staff."""

    alice: User
    bob: User
    staff: User
    host: Host
    spare: Host
    template: GuestTemplate
    guest: Guest
    request: ProvisioningRequest
    job: Job
    schedule: RebuildSchedule
    key: SshKey
    secrets: dict[str, str] = field(default_factory=dict)

    def token(self, caller: str) -> str:
        return self.secrets[caller]


def make_token(user: User, *, name: str, scope: str = ApiToken.Scope.WRITE, days: int = 30) -> str:
    """A live token of the user's; the secret to send."""
    return tokens.token_create(user=user, name=name, scope=scope, days=days).secret


def build_world() -> World:
    alice = factories.make_user("alice")
    bob = factories.make_user("bob")
    staff = factories.make_user("root-admin", staff=True)
    host = factories.make_host("local")
    # Same pool name and path: the storage counts as shared, so a migration may start.
    spare = factories.make_host("spare", uri="test:///spare-of-the-api-tests")
    template = factories.make_template(name="Tiny", host=host)
    guest = factories.make_guest(owner=alice, template=template, name="alice-web")
    request = provision.request_submit(
        owner=alice, template=template, overrides=provision.Overrides(name="alice-new")
    )
    job = Job.objects.get(request=request)
    schedule = schedules.schedule_create(guest=guest, by=alice, every_minutes=60)
    key = factories.make_ssh_key(owner=alice, name="alice-laptop")
    world = World(alice, bob, staff, host, spare, template, guest, request, job, schedule, key)
    world.secrets = {
        "owner": make_token(alice, name="alice write"),
        "reader": make_token(alice, name="alice read", scope=ApiToken.Scope.READ),
        "foreign": make_token(bob, name="bob write"),
        "staff": make_token(staff, name="staff write"),
    }
    revoked = tokens.token_create(
        user=alice, name="alice revoked", scope=ApiToken.Scope.WRITE, days=30
    )
    tokens.token_revoke(user=alice, token_id=revoked.token.pk)
    world.secrets["revoked"] = revoked.secret
    expired = tokens.token_create(
        user=alice, name="alice expired", scope=ApiToken.Scope.WRITE, days=1
    )
    ApiToken.objects.filter(pk=expired.token.pk).update(
        expires=timezone.now() - timedelta(minutes=1)
    )
    world.secrets["expired"] = expired.secret
    return world


@pytest.fixture
def world(db: None) -> World:
    return build_world()


def call(
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    client: Client | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """One API call through Django's test client (a token as `Authorization: Bearer`)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    extra: dict[str, Any] = {}
    if body is not None:
        extra = {"data": json.dumps(body), "content_type": "application/json"}
    return (client or Client()).generic(method, path, headers=sent, **extra)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The answer is problem details (RFC 9457) with `status`; its body."""
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert {"type", "title", "status", "detail", "instance", "errors"} <= set(problem)
    return problem


def error_fields(response: Any) -> set[str]:
    return {error["field"] for error in response.json()["errors"]}


@pytest.fixture
def api_test(settings: Any) -> Iterator[None]:
    """What each of these files' tests starts from (opt-in, with `pytestmark`, so the other
    files in this folder are left as they are):

    - no call counted yet this minute: SQLite hands a rolled-back test's token ids out again, and
      the counts are kept per token id;
    - whatever audit origin a call names in this thread is gone after the test.
    """
    server = redis.Redis.from_url(settings.REDIS_URL)
    for name in server.scan_iter("vmportal:api-rate:*"):
        server.delete(name)
    with audit.acting(audit.Channel.SYSTEM):
        yield
