"""Where a page's or the admin's work came from (channel, user, address), and logins, in the
audit log."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, iscoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.utils.functional import SimpleLazyObject

from provisioning.middleware import AuditOriginMiddleware
from provisioning.models import AuditEvent
from provisioning.services import audit
from tests.factories import PASSWORD, new_public_key

pytestmark = pytest.mark.django_db
IP = "203.0.113.9"


def only(action: str) -> AuditEvent:
    (row,) = AuditEvent.objects.filter(action=action)
    return row


# --- logins ---


def test_a_good_password_records_a_login_with_the_address(user) -> None:
    response = Client(REMOTE_ADDR=IP).post(
        "/accounts/login/", {"username": "alice", "password": PASSWORD}
    )
    assert response.status_code == 302
    row = only("login")
    assert (row.actor, row.actor_name, row.channel, row.source_ip) == (user, "alice", "web", IP)
    assert (row.result, row.object_type, row.object_repr) == ("ok", "user", "alice")


def test_a_bad_password_records_a_refusal_with_no_actor(user) -> None:
    response = Client(REMOTE_ADDR=IP).post(
        "/accounts/login/", {"username": "alice", "password": "not-it"}
    )
    assert response.status_code == 200  # the form again, with its error
    row = only("login_failed")
    assert (row.actor, row.actor_name, row.result) == (None, "", "refused")
    assert (row.channel, row.source_ip) == ("web", IP)
    assert "alice" in row.detail and "not-it" not in row.detail
    assert not AuditEvent.objects.filter(action="login").exists()


def test_a_login_to_the_admin_is_recorded_as_the_admins(staff) -> None:
    response = Client(REMOTE_ADDR=IP).post(
        "/admin/login/?next=/admin/", {"username": "root-admin", "password": PASSWORD}
    )
    assert response.status_code == 302
    assert (only("login").channel, only("login").actor) == ("admin", staff)


def test_a_logout_is_recorded(user) -> None:
    client = Client(REMOTE_ADDR=IP)
    client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert client.post("/accounts/logout/").status_code == 302
    row = only("logout")
    assert (row.actor, row.channel, row.source_ip) == (user, "web", IP)


# --- the pages' origin ---


def test_a_page_post_records_its_origin_as_the_web_with_the_address(user) -> None:
    client = Client(REMOTE_ADDR=IP)
    client.force_login(user)
    response = client.post("/profile/keys/", {"name": "laptop", "public_key": new_public_key()})
    assert response.status_code == 302
    row = only("ssh_key.add")
    assert (row.channel, row.source_ip, row.actor) == ("web", IP, user)


def origin_seen(path: str, **meta: str) -> audit.Origin:
    """The audit origin a view sees behind the middleware at `path`."""
    seen: list[audit.Origin] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append(audit.origin())
        return HttpResponse()

    request = RequestFactory().get(path, **meta)
    request.user = SimpleLazyObject(lambda: None)
    AuditOriginMiddleware(view)(request)
    return seen[0]


def test_the_pages_the_admin_and_the_api_each_have_their_channel() -> None:
    assert origin_seen("/guests/new", REMOTE_ADDR=IP).channel == "web"
    assert origin_seen("/guests/new", REMOTE_ADDR=IP).ip == IP
    assert origin_seen("/admin/provisioning/host/").channel == "admin"
    # The API names its user (and token) itself, once it has authenticated them.
    api = origin_seen("/api/v1/guests", REMOTE_ADDR=IP)
    assert (api.channel, api.ip, api.user) == ("api", IP, None)


def test_the_user_is_looked_up_only_when_a_row_is_recorded(user) -> None:
    looked: list[int] = []

    def find() -> object:
        looked.append(1)
        return user

    def quiet(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    def recording(request: HttpRequest) -> HttpResponse:
        audit.record("thing.do")
        return HttpResponse()

    request = RequestFactory().get("/")
    request.user = SimpleLazyObject(find)
    AuditOriginMiddleware(quiet)(request)
    assert looked == []
    AuditOriginMiddleware(recording)(request)
    assert looked == [1]
    assert only("thing.do").actor == user


def test_the_middleware_serves_an_async_chain_too() -> None:
    seen: list[audit.Origin] = []

    async def view(request: HttpRequest) -> HttpResponse:
        seen.append(audit.origin())
        return HttpResponse("streamed")

    middleware = AuditOriginMiddleware(view)
    assert iscoroutinefunction(middleware)
    request = RequestFactory().get("/guests/new", REMOTE_ADDR=IP)
    request.user = SimpleLazyObject(lambda: None)
    response = async_to_sync(middleware)(request)
    assert response.content == b"streamed"
    assert (seen[0].channel, seen[0].ip) == ("web", IP)
    assert audit.origin().ip is None  # and nothing is left behind
