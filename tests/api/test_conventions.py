"""The API's conventions: cursor pages, filters, problem details, field errors, 202 with a
Location, ETags and If-Match, rate limits, the browser's session, and the OpenAPI document."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import redis
from django.contrib.staticfiles import finders
from django.test import Client, RequestFactory

# The OpenAPI 3.1 specification's own JSON Schema, as schemathesis ships it.
from schemathesis.specs.openapi.definitions import OPENAPI_31

from provisioning.api import base
from provisioning.models import Guest, Job, ProvisioningRequest, RebuildSchedule, SshKey
from tests.api.conftest import (
    PROBLEM,
    World,
    assert_problem,
    call,
    error_fields,
    make_token,
)
from tests.factories import make_guest, make_user, new_public_key
from tests.support.stack import wait_until

pytestmark = pytest.mark.usefixtures("api_test")
API = "/api/v1"
THREADS = 30
ROUNDS = 60


def guests_url(world: World) -> str:
    return f"{API}/guests/{world.guest.uuid}"


def names(response: Any) -> list[str]:
    assert response.status_code == 200, response.content[:500]
    return sorted(item["name"] for item in response.json()["items"])


# --- cursor pages ---


def test_a_walk_with_limit_50_sees_each_of_120_guests_once_in_three_pages(world: World) -> None:
    carol = make_user("carol")
    made = {str(make_guest(owner=carol, host=world.host).uuid) for _ in range(120)}
    token = make_token(carol, name="walk")
    pages: list[list[str]] = []
    url: str | None = f"{API}/guests?limit=50"
    while url is not None:
        response = call("GET", url, token=token)
        assert response.status_code == 200
        body = response.json()
        pages.append([item["uuid"] for item in body["items"]])
        url = None if body["next"] is None else f"{API}/guests?limit=50&cursor={body['next']}"
        assert len(pages) <= 3, "the walk did not end"
    assert [len(page) for page in pages] == [50, 50, 20]
    seen = [uuid for page in pages for uuid in page]
    assert len(seen) == len(set(seen)), "a guest came twice"
    assert set(seen) == made, "a guest was missed"


@pytest.mark.parametrize(
    "cursor",
    [
        base64.urlsafe_b64encode(b"before:7").decode().rstrip("="),  # not our kind
        base64.urlsafe_b64encode(b"after:seven").decode().rstrip("="),  # not a number
        base64.urlsafe_b64encode(b"after:99999999999999999999").decode().rstrip("="),  # too big
        "abc",  # not base64 of text
    ],
)
def test_a_cursor_the_api_did_not_give_out_is_refused_naming_the_field(
    world: World, cursor: str
) -> None:
    response = call("GET", f"{API}/guests?cursor={cursor}", token=world.token("owner"))
    problem = assert_problem(response, 422)
    assert [error["field"] for error in problem["errors"]] == ["cursor"]


def test_a_cursor_with_characters_a_cursor_never_has_is_refused_naming_the_field(
    world: World,
) -> None:
    response = call("GET", f"{API}/guests?cursor=a%2Fb", token=world.token("owner"))
    assert_problem(response, 422)
    assert error_fields(response) == {"cursor"}


def test_a_limit_over_200_is_refused_naming_the_field(world: World) -> None:
    response = call("GET", f"{API}/guests?limit=201", token=world.token("owner"))
    assert_problem(response, 422)
    assert error_fields(response) == {"limit"}


# --- filters ---


@pytest.fixture
def more_guests(world: World) -> None:
    make_guest(owner=world.alice, host=world.spare, name="alice-db", state=Guest.State.PAUSED)
    make_guest(owner=world.bob, host=world.host, name="bob-web")


@pytest.mark.usefixtures("more_guests")
def test_guests_filter_by_state_host_and_name(world: World) -> None:
    token = world.token("owner")
    assert names(call("GET", f"{API}/guests", token=token)) == ["alice-db", "alice-web"]
    assert names(call("GET", f"{API}/guests?state=paused", token=token)) == ["alice-db"]
    assert names(call("GET", f"{API}/guests?state=running", token=token)) == ["alice-web"]
    assert names(call("GET", f"{API}/guests?host=spare", token=token)) == ["alice-db"]
    assert names(call("GET", f"{API}/guests?host=local", token=token)) == ["alice-web"]
    assert names(call("GET", f"{API}/guests?q=WEB", token=token)) == ["alice-web"]
    assert names(call("GET", f"{API}/guests?q=nothing-like-it", token=token)) == []


@pytest.mark.usefixtures("more_guests")
def test_deleted_guests_show_only_when_asked_for(world: World) -> None:
    token = world.token("owner")
    Guest.objects.filter(name="alice-db").update(state=Guest.State.UNDEFINED)
    assert "alice-db" not in names(call("GET", f"{API}/guests", token=token))
    assert "alice-db" in names(call("GET", f"{API}/guests?state=undefined", token=token))


@pytest.mark.usefixtures("more_guests")
def test_staff_filter_by_owner_and_everyone_else_cannot_reach_other_owners_with_it(
    world: World,
) -> None:
    staff = world.token("staff")
    assert names(call("GET", f"{API}/guests?owner=bob", token=staff)) == ["bob-web"]
    assert names(call("GET", f"{API}/guests?owner=alice", token=staff)) == [
        "alice-db",
        "alice-web",
    ]
    assert names(call("GET", f"{API}/guests?q=web", token=staff)) == ["alice-web", "bob-web"]
    # For anyone else the filter is ignored: still only their own guests.
    alice = world.token("owner")
    assert names(call("GET", f"{API}/guests?owner=bob", token=alice)) == [
        "alice-db",
        "alice-web",
    ]


def test_an_unknown_state_is_refused_naming_the_field(world: World) -> None:
    response = call("GET", f"{API}/guests?state=melted", token=world.token("owner"))
    assert_problem(response, 422)
    assert error_fields(response) == {"state"}


def test_requests_filter_by_status(world: World) -> None:
    token = world.token("owner")
    status = world.request.status
    listed = call("GET", f"{API}/requests?status={status}", token=token).json()["items"]
    assert [item["id"] for item in listed] == [world.request.pk]
    assert call("GET", f"{API}/requests?status=failed", token=token).json()["items"] == []


# --- problem details ---


def _stale(world: World) -> Any:
    etag = call("GET", f"{API}/keys/{world.key.pk}", token=world.token("owner"))["ETag"]
    SshKey.objects.filter(pk=world.key.pk).update(name="moved-on")
    return call(
        "PATCH",
        f"{API}/keys/{world.key.pk}",
        token=world.token("owner"),
        body={"name": "mine"},
        headers={"If-Match": etag},
    )


PROBLEMS: dict[int, Callable[[World], Any]] = {
    401: lambda w: call("GET", f"{API}/guests"),
    403: lambda w: call("POST", f"{API}/keys", token=w.token("reader"), body={"name": "x"}),
    404: lambda w: call(
        "GET", f"{API}/guests/00000000-0000-4000-8000-000000000000", token=w.token("owner")
    ),
    # resume is for paused guests; alice-web runs.
    409: lambda w: call("POST", f"{guests_url(w)}/actions/resume", token=w.token("owner")),
    412: _stale,
    422: lambda w: call(
        "POST", f"{API}/requests", token=w.token("owner"), body={"template": w.template.pk}
    ),
}


@pytest.mark.parametrize("status", list(PROBLEMS))
def test_every_error_is_problem_details(world: World, status: int) -> None:
    response = PROBLEMS[status](world)
    problem = assert_problem(response, status)
    assert response["Content-Type"] == PROBLEM
    assert set(problem) == {"type", "title", "status", "detail", "instance", "errors"}
    assert problem["type"] == "about:blank"
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    assert problem["instance"] == response.wsgi_request.path
    assert isinstance(problem["errors"], list)
    for error in problem["errors"]:
        assert set(error) == {"field", "message"}


def test_a_missing_field_is_named(world: World) -> None:
    response = PROBLEMS[422](world)
    assert error_fields(response) == {"name"}


def test_a_name_with_a_space_is_refused_naming_the_field(world: World) -> None:
    body = {"template": world.template.pk, "name": "my guest"}
    response = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    assert_problem(response, 422)
    assert error_fields(response) == {"name"}
    assert not ProvisioningRequest.objects.filter(name="my guest").exists()


def test_vcpus_beyond_the_templates_range_are_refused_naming_the_field(world: World) -> None:
    most = world.template.size_range("vcpus")[2]
    body = {"template": world.template.pk, "name": "greedy", "vcpus": most + 1}
    response = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    problem = assert_problem(response, 422)
    assert error_fields(response) == {"vcpus"}
    assert str(most) in problem["errors"][0]["message"]
    assert not ProvisioningRequest.objects.filter(name="greedy").exists()


def test_an_unknown_template_is_refused_naming_the_field(world: World) -> None:
    body = {"template": world.template.pk + 1000, "name": "nowhere"}
    response = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    assert_problem(response, 422)
    assert error_fields(response) == {"template"}


def test_a_body_that_is_not_json_is_refused_as_problem_details(world: World) -> None:
    response = Client().post(
        f"{API}/keys",
        data="{not json",
        content_type="application/json",
        headers={"Authorization": f"Bearer {world.token('owner')}"},
    )
    assert_problem(response, 400)
    assert not SshKey.objects.exclude(pk=world.key.pk).exists()


def test_an_unknown_path_under_the_api_is_problem_details(world: World) -> None:
    response = call("GET", f"{API}/nothing-here", token=world.token("owner"))
    assert_problem(response, 404)


# --- 202 and Location ---


ACCEPTED: dict[str, Callable[[World], Any]] = {
    "ask for a guest": lambda w: call(
        "POST",
        f"{API}/requests",
        token=w.token("owner"),
        body={"template": w.template.pk, "name": "fresh"},
    ),
    "an action": lambda w: call("POST", f"{guests_url(w)}/actions/suspend", token=w.token("owner")),
    "a rebuild": lambda w: call(
        "POST", f"{guests_url(w)}/rebuild", token=w.token("owner"), body={}
    ),
    "a delete": lambda w: call("DELETE", guests_url(w), token=w.token("owner")),
    "a request's cancel": lambda w: call(
        "POST", f"{API}/requests/{w.request.pk}/cancel", token=w.token("owner")
    ),
    "a job's cancel": lambda w: call(
        "POST", f"{API}/jobs/{w.job.pk}/cancel", token=w.token("owner")
    ),
}


@pytest.mark.parametrize("what", list(ACCEPTED))
def test_long_work_answers_202_with_a_location_that_answers_200(world: World, what: str) -> None:
    response = ACCEPTED[what](world)
    assert response.status_code == 202, response.content[:500]
    location = response["Location"]
    assert location.startswith(f"{API}/")
    accepted = response.json()
    assert accepted["url"] == location
    followed = call("GET", location, token=world.token("owner"))
    assert followed.status_code == 200
    assert followed.json()["id"] == accepted["id"]


# --- ETags and If-Match ---


def test_a_read_carries_an_etag_that_moves_only_when_the_thing_does(world: World) -> None:
    token = world.token("owner")
    first = call("GET", guests_url(world), token=token)["ETag"]
    assert re.fullmatch(r'"[0-9a-f]+"', first)
    assert call("GET", guests_url(world), token=token)["ETag"] == first
    Guest.objects.filter(pk=world.guest.pk).update(autostart=True)
    assert call("GET", guests_url(world), token=token)["ETag"] != first


def _schedule_enabled(world: World) -> bool:
    return RebuildSchedule.objects.get(pk=world.schedule.pk).periodic_task.enabled


def _key_name(world: World) -> str | None:
    return SshKey.objects.filter(pk=world.key.pk).values_list("name", flat=True).first()


# Each: the thing's URL; the change sent with If-Match (method, path after the URL, body); and
# how the thing moves on behind the caller's back between their read and their change.
CONDITIONAL: dict[str, tuple[Callable[[World], str], str, str, Any, Callable[[World], Any]]] = {
    "PATCH a schedule": (
        lambda w: f"{API}/schedules/{w.schedule.pk}",
        "PATCH",
        "",
        {"enabled": True},
        # Someone else turned it off; the stale change would turn it on again.
        lambda w: call(
            "PATCH",
            f"{API}/schedules/{w.schedule.pk}",
            token=w.token("owner"),
            body={"enabled": False},
        ),
    ),
    "PATCH a key": (
        lambda w: f"{API}/keys/{w.key.pk}",
        "PATCH",
        "",
        {"name": "second"},
        lambda w: SshKey.objects.filter(pk=w.key.pk).update(name="first"),
    ),
    "DELETE a key": (
        lambda w: f"{API}/keys/{w.key.pk}",
        "DELETE",
        "",
        None,
        lambda w: SshKey.objects.filter(pk=w.key.pk).update(name="first"),
    ),
    "a guest action": (
        guests_url,
        "POST",
        "/actions/suspend",
        None,
        # What the listener does when libvirt says the guest changed.
        lambda w: Guest.objects.filter(pk=w.guest.pk).update(autostart=True),
    ),
}


def state_of(world: World) -> tuple[Any, ...]:
    return (
        _schedule_enabled(world),
        _key_name(world),
        Job.objects.filter(guest=world.guest).count(),
    )


@pytest.mark.parametrize("what", list(CONDITIONAL))
def test_a_stale_if_match_changes_nothing_and_the_current_one_goes_through(
    world: World, what: str
) -> None:
    url_of, method, tail, body, move_on = CONDITIONAL[what]
    token = world.token("owner")
    url = url_of(world)
    stale = call("GET", url, token=token)["ETag"]
    move_on(world)
    before = state_of(world)

    refused = call(method, url + tail, token=token, body=body, headers={"If-Match": stale})

    assert_problem(refused, 412)
    assert state_of(world) == before
    current = call("GET", url, token=token)["ETag"]
    assert current != stale
    done = call(method, url + tail, token=token, body=body, headers={"If-Match": current})
    assert done.status_code in (200, 202, 204), done.content[:500]
    assert state_of(world) != before


def test_a_changed_resource_answers_the_etag_its_next_read_has(world: World) -> None:
    token = world.token("owner")
    url = f"{API}/keys/{world.key.pk}"
    renamed = call(
        "PATCH",
        url,
        token=token,
        body={"name": "desk"},
        headers={"If-Match": call("GET", url, token=token)["ETag"]},
    )
    assert renamed.status_code == 200
    assert renamed["ETag"] == call("GET", url, token=token)["ETag"]


def test_if_match_star_and_a_list_with_the_current_etag_both_match(world: World) -> None:
    token = world.token("owner")
    url = f"{API}/schedules/{world.schedule.pk}"
    star = call("PATCH", url, token=token, body={"enabled": False}, headers={"If-Match": "*"})
    assert star.status_code == 200
    current = call("GET", url, token=token)["ETag"]
    listed = call(
        "PATCH",
        url,
        token=token,
        body={"enabled": True},
        headers={"If-Match": f'"0000", W/{current}'},
    )
    assert listed.status_code == 200
    assert _schedule_enabled(world) is True


# --- rate limits ---


def test_the_sixth_call_in_a_minute_is_refused_with_retry_after_for_that_token_only(
    world: World, settings
) -> None:
    settings.API_RATE_PER_MINUTE = 5
    # The count is per calendar minute: start where six calls surely fit in one.
    wait_until(
        lambda: time.time() % 60 < 45, timeout=20, what="a minute with time to spare", every=0.2
    )
    token, other = world.token("owner"), world.token("reader")
    for _ in range(5):
        assert call("GET", f"{API}/quota", token=token).status_code == 200

    refused = call("GET", f"{API}/quota", token=token)

    problem = assert_problem(refused, 429)
    retry = refused["Retry-After"]
    assert re.fullmatch(r"[0-9]+", retry), retry
    assert 1 <= int(retry) <= 61
    assert retry in problem["detail"]
    # Another token of the same user has its own count.
    assert call("GET", f"{API}/quota", token=other).status_code == 200


def test_the_browsers_session_has_its_own_count(world: World, settings) -> None:
    settings.API_RATE_PER_MINUTE = 2
    wait_until(
        lambda: time.time() % 60 < 45, timeout=20, what="a minute with time to spare", every=0.2
    )
    client = Client()
    client.force_login(world.alice)
    assert [client.get(f"{API}/quota").status_code for _ in range(3)] == [200, 200, 429]
    assert call("GET", f"{API}/quota", token=world.token("owner")).status_code == 200


def _at_once(key: str) -> list[str]:
    """THREADS calls of the rate limiter at the same moment; what each raised, if anything."""
    request = RequestFactory().get(f"{API}/quota")
    start = threading.Barrier(THREADS)
    failures: list[str] = []

    def one_call() -> None:
        start.wait(timeout=30)
        try:
            base._limit(request, key)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            failures.append(repr(exc))

    threads = [threading.Thread(target=one_call) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return failures


def test_the_first_calls_a_new_process_serves_at_once_all_count(monkeypatch, settings) -> None:
    """A new web process meets its first callers side by side (under ASGI each request runs in
    a thread of its own): each call is counted, and none fails on the limiter's Redis client."""
    failures: list[str] = []
    for attempt in range(ROUNDS):
        monkeypatch.setattr(base, "_redis", None)  # what a new process starts with
        failures += _at_once(f"first-calls:{attempt}")
    assert failures == []
    counted = redis.Redis.from_url(settings.REDIS_URL)
    window = int(time.time() // 60)
    counts = [
        int(counted.get(f"vmportal:api-rate:first-calls:{n}:{w}") or 0)
        for n in range(ROUNDS)
        for w in (window - 1, window)
    ]
    assert sum(counts) == ROUNDS * THREADS


# --- the browser's session ---


def test_a_logged_in_browser_reads_with_its_session(world: World) -> None:
    client = Client()
    client.force_login(world.alice)
    response = client.get(f"{API}/guests")
    assert response.status_code == 200
    assert [item["name"] for item in response.json()["items"]] == ["alice-web"]


def test_a_session_write_without_the_csrf_token_is_refused(world: World) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)
    response = client.post(
        f"{API}/keys",
        data=json.dumps({"name": "desk", "public_key": new_public_key()}),
        content_type="application/json",
    )
    assert_problem(response, 403)
    assert not SshKey.objects.filter(name="desk").exists()


def test_a_session_write_with_the_csrf_token_goes_through(world: World) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)
    assert client.get("/").status_code == 200  # the page sets the CSRF cookie
    csrf = client.cookies["csrftoken"].value
    response = client.post(
        f"{API}/keys",
        data=json.dumps({"name": "desk", "public_key": new_public_key()}),
        content_type="application/json",
        headers={"X-CSRFToken": csrf},
    )
    assert response.status_code == 201, response.content[:500]
    assert SshKey.objects.get(name="desk").owner == world.alice


def test_a_token_write_needs_no_csrf_token(world: World) -> None:
    client = Client(enforce_csrf_checks=True)
    response = call(
        "POST",
        f"{API}/keys",
        token=world.token("owner"),
        body={"name": "desk", "public_key": new_public_key()},
        client=client,
    )
    assert response.status_code == 201


def test_a_token_wins_over_the_session_it_comes_with(world: World) -> None:
    client = Client()
    client.force_login(world.bob)
    response = call("GET", f"{API}/guests", token=world.token("owner"), client=client)
    assert [item["name"] for item in response.json()["items"]] == ["alice-web"]
    refused = call("GET", f"{API}/guests", token=world.token("revoked"), client=client)
    assert_problem(refused, 401)


def test_a_malformed_authorization_header_is_refused(world: World) -> None:
    for header in ("Basic YWxpY2U6cHc=", "Bearer", "Bearer vmp_not-a-token", "Bearer  "):
        response = Client().get(f"{API}/guests", headers={"Authorization": header})
        assert_problem(response, 401)
        assert response["WWW-Authenticate"].startswith("Bearer")


# --- the OpenAPI document and the docs page ---


def test_the_openapi_document_is_openapi_3_1_with_errors_as_problem_details(db: None) -> None:
    response = Client().get(f"{API}/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.1")
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    errors = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if str(status)[0] in "45":
                    errors += 1
                    assert set(answer["content"]) == {PROBLEM}, (method, path, status)
            assert {"401", "403", "404", "422", "429"} <= set(map(str, operation["responses"]))
    assert errors > 0


def test_the_docs_page_uses_our_own_swagger_ui_and_no_other_site(db: None) -> None:
    response = Client().get(f"{API}/docs")
    assert response.status_code == 200
    page = response.content.decode()
    referenced = re.findall(r'(?:src|href)="(/static/vendor/swagger-ui/[^"]+)"', page)
    assert {r.rsplit("/", 1)[1] for r in referenced} == {"swagger-ui-bundle.js", "swagger-ui.css"}
    assert not re.search(r"https?://", page), re.findall(r"https?://\S+", page)
    assert f'data-schema-url="{API}/openapi.json"' in page


def test_the_files_the_docs_page_names_are_there_to_serve() -> None:
    for name in ("vendor/swagger-ui/swagger-ui-bundle.js", "vendor/swagger-ui/swagger-ui.css"):
        assert finders.find(name), f"static/{name} is missing (scripts/setup.sh copies it)"


def test_a_method_the_path_does_not_take_is_problem_details(world: World) -> None:
    response = call("PUT", f"{API}/guests", token=world.token("owner"), body={})
    assert_problem(response, 405)
    assert "GET" in response["Allow"]


# --- HEAD ---


def test_head_answers_as_get_without_the_body_and_starts_no_stream(world: World) -> None:
    token = world.token("owner")
    for path in (f"{API}/guests", f"{API}/guests/{world.guest.uuid}", f"{API}/templates"):
        got = call("GET", path, token=token)
        head = call("HEAD", path, token=token)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"", path
        assert head["Content-Type"] == got["Content-Type"], path
        assert head["Content-Length"] == str(len(got.content)), path
        assert head.get("ETag") == got.get("ETag"), path
    # Refusals are the GET's too: no token, someone else's guest.
    assert call("HEAD", f"{API}/guests").status_code == 401
    foreign = call("HEAD", f"{API}/guests/{world.guest.uuid}", token=world.token("foreign"))
    assert foreign.status_code == 404 and foreign.content == b""
    # A live stream answers its headers and is not started.
    events = call("HEAD", f"{API}/guests/{world.guest.uuid}/events", token=token)
    assert events.status_code == 200 and events["Content-Type"].startswith("text/event-stream")
    assert not events.streaming
