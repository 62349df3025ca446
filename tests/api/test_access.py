"""Every operation of the API, for every kind of caller: who gets what, and that nothing changes
for a caller who is turned away.

The table names each operation of the OpenAPI document; an operation added without a row
fails `test_the_table_names_every_operation_of_the_openapi_document`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.utils import timezone

from provisioning.api.routes import api
from provisioning.models import (
    Guest,
    GuestTemplate,
    Job,
    ProvisioningRequest,
    RebuildSchedule,
    Snapshot,
    SshKey,
)
from tests.api.conftest import World, assert_problem, call
from tests.factories import make_template, new_public_key

pytestmark = pytest.mark.usefixtures("api_test")
Body = Callable[[World], dict[str, Any]]
Mine = Callable[[World, Any], bool]

# Who may see what:
SHARED = "shared"  # the same for everyone who is logged in (templates)
OWN = "own"  # each caller's own (a list, the quota, a new thing)
OBJECT = "object"  # one of alice's things: hers and the staff's, 404 for anyone else
PERSONAL = "personal"  # one of alice's SSH keys: hers alone, 404 for staff too
STAFF = "staff"  # staff only: 404 for everyone else

CALLERS = ("owner", "foreign", "staff", "anonymous", "revoked", "expired", "reader")
# The live streams answer forever: tests/api/test_events_api.py reads them with a timeout.
STREAMS = {("GET", "/api/v1/guests/{uuid}/events"), ("GET", "/api/v1/requests/{id}/events")}


def ids(body: Any) -> set[Any]:
    return {item.get("id", item.get("uuid")) for item in body["items"]}


@dataclass(frozen=True)
class Op:
    ok: int
    who: str
    body: Body | None = None
    mine: Mine | None = None  # whether a 2xx body shows alice's thing
    given: Callable[[World], object] | None = None  # what must exist first (not in the world)


def a_snapshot(world: World) -> Snapshot:
    """One snapshot of alice's guest (only for the snapshot operations: migration refuses a
    guest that has any)."""
    return Snapshot.objects.create(
        guest=world.guest, name="base", taken=timezone.now(), state="running", memory=True
    )


TABLE: dict[tuple[str, str], Op] = {
    ("GET", "/api/v1/templates"): Op(200, SHARED),
    ("GET", "/api/v1/templates/{id}"): Op(200, SHARED),
    ("GET", "/api/v1/guests"): Op(200, OWN, mine=lambda w, b: str(w.guest.uuid) in ids(b)),
    ("GET", "/api/v1/guests/{uuid}"): Op(
        200, OBJECT, mine=lambda w, b: b["uuid"] == str(w.guest.uuid)
    ),
    ("GET", "/api/v1/guests/{uuid}/stats"): Op(200, OBJECT, mine=lambda w, b: b["range"] == "hour"),
    ("DELETE", "/api/v1/guests/{uuid}"): Op(202, OBJECT),
    ("GET", "/api/v1/guests/{uuid}/snapshots"): Op(
        200, OBJECT, mine=lambda w, b: [i["name"] for i in b["items"]] == ["base"], given=a_snapshot
    ),
    ("POST", "/api/v1/guests/{uuid}/snapshots"): Op(
        202, OBJECT, body=lambda w: {"name": "api-snap"}
    ),
    ("POST", "/api/v1/guests/{uuid}/snapshots/{name}/revert"): Op(202, OBJECT, given=a_snapshot),
    ("DELETE", "/api/v1/guests/{uuid}/snapshots/{name}"): Op(202, OBJECT, given=a_snapshot),
    ("POST", "/api/v1/guests/{uuid}/actions/{kind}"): Op(202, OBJECT),
    ("POST", "/api/v1/guests/{uuid}/rebuild"): Op(202, OBJECT, body=lambda w: {}),
    ("POST", "/api/v1/guests/{uuid}/migrate"): Op(202, STAFF, body=lambda w: {"dest": w.spare.pk}),
    ("GET", "/api/v1/guests/{uuid}/schedules"): Op(
        200, OBJECT, mine=lambda w, b: w.schedule.pk in ids(b)
    ),
    ("POST", "/api/v1/guests/{uuid}/schedules"): Op(
        201, OBJECT, body=lambda w: {"every_minutes": 30}
    ),
    ("GET", "/api/v1/requests"): Op(200, OWN, mine=lambda w, b: w.request.pk in ids(b)),
    ("POST", "/api/v1/requests"): Op(
        202, OWN, body=lambda w: {"template": w.template.pk, "name": "fresh"}
    ),
    ("GET", "/api/v1/requests/{id}"): Op(200, OBJECT, mine=lambda w, b: b["id"] == w.request.pk),
    ("POST", "/api/v1/requests/{id}/cancel"): Op(202, OBJECT),
    ("GET", "/api/v1/jobs/{id}"): Op(200, OBJECT, mine=lambda w, b: b["id"] == w.job.pk),
    ("POST", "/api/v1/jobs/{id}/cancel"): Op(202, OBJECT),
    ("GET", "/api/v1/schedules/{id}"): Op(200, OBJECT, mine=lambda w, b: b["id"] == w.schedule.pk),
    ("PATCH", "/api/v1/schedules/{id}"): Op(200, OBJECT, body=lambda w: {"enabled": False}),
    ("DELETE", "/api/v1/schedules/{id}"): Op(204, OBJECT),
    ("GET", "/api/v1/quota"): Op(200, OWN, mine=lambda w, b: b["usage"]["guests"] > 0),
    ("GET", "/api/v1/keys"): Op(200, OWN, mine=lambda w, b: w.key.pk in ids(b)),
    ("POST", "/api/v1/keys"): Op(
        201, OWN, body=lambda w: {"name": "desk", "public_key": new_public_key()}
    ),
    ("GET", "/api/v1/keys/{id}"): Op(200, PERSONAL, mine=lambda w, b: b["id"] == w.key.pk),
    ("PATCH", "/api/v1/keys/{id}"): Op(200, PERSONAL, body=lambda w: {"name": "renamed"}),
    ("DELETE", "/api/v1/keys/{id}"): Op(204, PERSONAL),
    ("GET", "/api/v1/hosts"): Op(200, STAFF),
    ("GET", "/api/v1/hosts/{id}"): Op(200, STAFF),
}


def path_of(world: World, template: str) -> str:
    """The path with alice's things in its placeholders."""
    collection = template.split("/")[3]
    the_id = {
        "templates": world.template.pk,
        "requests": world.request.pk,
        "jobs": world.job.pk,
        "schedules": world.schedule.pk,
        "keys": world.key.pk,
        "hosts": world.host.pk,
    }.get(collection)
    return template.format(uuid=world.guest.uuid, id=the_id, kind="suspend", name="base")


def expected(method: str, op: Op, caller: str) -> int:
    if caller in ("anonymous", "revoked", "expired"):
        return 401
    if caller == "reader" and method != "GET":
        return 403
    if op.who == STAFF and caller != "staff":
        return 404
    if op.who == OBJECT and caller == "foreign":
        return 404
    if op.who == PERSONAL and caller in ("foreign", "staff"):
        return 404
    return op.ok


def snapshot() -> tuple[Any, ...]:
    """Everything a call could change, to tell that a refused one changed nothing."""
    return (
        sorted(Guest.objects.values_list("pk", "state", "host_id")),
        sorted(Job.objects.values_list("pk", "kind", "status")),
        sorted(ProvisioningRequest.objects.values_list("pk", "status")),
        sorted(RebuildSchedule.objects.values_list("pk", "periodic_task__enabled")),
        sorted(SshKey.objects.values_list("pk", "owner_id", "name")),
    )


def test_the_table_names_every_operation_of_the_openapi_document() -> None:
    schema = api.get_openapi_schema()
    documented = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
    }
    assert set(TABLE) | STREAMS == documented
    assert not set(TABLE) & STREAMS


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("operation", list(TABLE), ids=" ".join)
def test_each_caller_gets_what_their_rights_allow_and_nothing_else(
    world: World, operation: tuple[str, str], caller: str
) -> None:
    method, template = operation
    op = TABLE[operation]
    token = None if caller == "anonymous" else world.token(caller)
    if op.given is not None:
        op.given(world)
    before = snapshot()

    response = call(
        method,
        path_of(world, template),
        token=token,
        body=op.body(world) if op.body else None,
    )

    status = expected(method, op, caller)
    assert response.status_code == status, response.content[:500]
    after = snapshot()
    if status >= 400:
        problem = assert_problem(response, status)
        assert problem["instance"] == path_of(world, template)
        assert after == before, "a refused call changed something"
    elif method == "GET":
        assert after == before, "a read changed something"
    else:
        assert after != before, "a write answered success but changed nothing"
    if status == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
    if caller == "foreign" and status < 400:
        # Never a success that shows alice's things, whatever the operation.
        assert b"alice" not in response.content
        assert str(world.guest.uuid).encode() not in response.content
    if 200 <= status < 300 and op.mine is not None:
        shows_hers = op.mine(world, response.json())
        # Staff see everyone's guests and requests; keys and the quota stay personal.
        assert shows_hers == (
            caller in ("owner", "reader")
            or (caller == "staff" and op.who == OBJECT)
            or (
                caller == "staff"
                and operation in {("GET", "/api/v1/guests"), ("GET", "/api/v1/requests")}
            )
        )


def test_no_one_can_put_someone_elses_ssh_key_on_their_guest(world: World) -> None:
    cloud = make_template(
        name="Cloud",
        method=GuestTemplate.Method.CLOUD,
        host=world.host,
        base_volume="debian-12-genericcloud-amd64.qcow2",
    )
    body = {"template": cloud.pk, "name": "borrowed", "ssh_keys": [world.key.pk]}
    before = snapshot()

    response = call("POST", "/api/v1/requests", token=world.token("foreign"), body=body)

    problem = assert_problem(response, 422)
    assert [error["field"] for error in problem["errors"]] == ["ssh_keys"]
    assert world.key.fingerprint not in response.content.decode()
    assert snapshot() == before
    # Her own key she may use.
    mine = call("POST", "/api/v1/requests", token=world.token("owner"), body=body)
    assert mine.status_code == 202, mine.content[:500]
    assert ProvisioningRequest.objects.get(pk=mine.json()["id"]).guest.ssh_keys == [
        world.key.public_key
    ]
