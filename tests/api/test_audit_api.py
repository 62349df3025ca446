"""What the API writes to the audit log: one row per change or refusal, naming the channel, the
actor, the token and the address it came from."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from django.test import Client

from provisioning.models import AuditEvent
from tests.api.conftest import World, build_world, call
from tests.factories import new_public_key

pytestmark = pytest.mark.usefixtures("api_test")
API = "/api/v1"
OK, REFUSED = AuditEvent.Result.OK, AuditEvent.Result.REFUSED


def rows_written_by(do: Any) -> tuple[Any, list[AuditEvent]]:
    """What `do()` answered, and the audit rows written while it ran."""
    last = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    response = do()
    rows = list(AuditEvent.objects.filter(pk__gt=last).order_by("pk"))
    return response, rows


def only_row(rows: list[AuditEvent]) -> AuditEvent:
    assert len(rows) == 1, [(r.action, r.result) for r in rows]
    return rows[0]


def assert_came_through_the_api(row: AuditEvent, world: World, token_name: str) -> None:
    assert row.channel == AuditEvent.Channel.API
    assert (row.actor, row.actor_name) == (world.alice, "alice")
    assert row.token_name == token_name
    assert row.source_ip == "127.0.0.1"


def test_a_request_made_through_the_api_is_one_row(world: World) -> None:
    body = {"template": world.template.pk, "name": "audited"}
    response, rows = rows_written_by(
        lambda: call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    )
    assert response.status_code == 202
    row = only_row(rows)
    assert (row.action, row.result) == ("request.create", OK)
    assert "audited" in row.object_repr
    assert_came_through_the_api(row, world, "alice write")


def test_an_action_through_the_api_is_one_row(world: World) -> None:
    url = f"{API}/guests/{world.guest.uuid}/actions/suspend"
    response, rows = rows_written_by(lambda: call("POST", url, token=world.token("owner")))
    assert response.status_code == 202
    row = only_row(rows)
    assert (row.action, row.result) == ("guest.suspend", OK)
    assert row.object_id == str(world.guest.uuid)
    assert_came_through_the_api(row, world, "alice write")


def test_an_action_the_guests_state_refuses_is_one_refused_row(world: World) -> None:
    url = f"{API}/guests/{world.guest.uuid}/actions/resume"  # alice-web runs: nothing to resume
    response, rows = rows_written_by(lambda: call("POST", url, token=world.token("owner")))
    assert response.status_code == 409
    row = only_row(rows)
    assert (row.action, row.result) == ("guest.resume", REFUSED)
    assert row.detail == response.json()["detail"]
    assert_came_through_the_api(row, world, "alice write")


def test_a_write_with_a_read_only_token_is_one_refused_row(world: World) -> None:
    url = f"{API}/guests/{world.guest.uuid}/actions/suspend"
    response, rows = rows_written_by(lambda: call("POST", url, token=world.token("reader")))
    assert response.status_code == 403
    row = only_row(rows)
    assert row.result == REFUSED
    assert row.action == "api.post"
    assert row.object_repr == url
    assert row.detail == response.json()["detail"]
    assert_came_through_the_api(row, world, "alice read")


def test_a_write_with_the_browsers_session_is_one_row_without_a_token(world: World) -> None:
    client = Client()
    client.force_login(world.alice)
    body = {"name": "desk", "public_key": new_public_key()}
    response, rows = rows_written_by(lambda: call("POST", f"{API}/keys", body=body, client=client))
    assert response.status_code == 201
    row = only_row(rows)
    assert (row.action, row.result) == ("ssh_key.add", OK)
    assert_came_through_the_api(row, world, "")
    assert row.token is None


@pytest.mark.parametrize("caller", ["owner", "reader"])
def test_reads_write_no_rows(world: World, caller: str) -> None:
    url = f"{API}/guests/{world.guest.uuid}"
    response, rows = rows_written_by(lambda: call("GET", url, token=world.token(caller)))
    assert response.status_code == 200
    assert rows == []


def test_a_request_made_through_the_real_server_names_the_api_and_the_address(stack) -> None:
    """Under ASGI the origin is set in the middleware's context and the token found in the
    view's thread: the row still names both."""
    world = build_world()
    stack.start("web")
    last = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    response = requests.post(
        f"{stack.base_url}{API}/requests",
        json={"template": world.template.pk, "name": "served"},
        headers={"Authorization": f"Bearer {world.token('owner')}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text[:500]
    row = only_row(list(AuditEvent.objects.filter(pk__gt=last)))
    assert (row.action, row.result) == ("request.create", OK)
    assert_came_through_the_api(row, world, "alice write")
