"""Pages render for their owner, partials for htmx, and nothing leaks to other users."""

from __future__ import annotations

import pytest
from django.test import Client

from provisioning.models import Guest, GuestTemplate, Job, ProvisioningRequest
from tests.factories import make_guest, make_host, make_template

pytestmark = pytest.mark.django_db


@pytest.fixture
def template() -> GuestTemplate:
    return make_template(name="Tiny", host=make_host(), description="A tiny guest")


@pytest.fixture
def guest(user, template: GuestTemplate) -> Guest:
    return make_guest(owner=user, template=template, name="web1")


def test_the_dashboard_lists_my_guests_with_state_badges(user_client: Client, guest: Guest) -> None:
    page = user_client.get("/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "web1" in body and 'data-state="running"' in body
    assert 'sse-connect="/events"' in body


def test_the_dashboard_partial_is_only_the_table(user_client: Client, guest: Guest) -> None:
    page = user_client.get("/", {"q": "web"}, HTTP_HX_REQUEST="true")
    body = page.content.decode()
    assert body.lstrip().startswith('<div id="guest-table">')
    assert "<html" not in body


def test_new_guest_shows_template_cards_then_a_form(
    user_client: Client, template: GuestTemplate
) -> None:
    cards = user_client.get("/guests/new")
    assert "Tiny" in cards.content.decode()
    form = user_client.get("/guests/new", {"template": template.pk})
    assert form.status_code == 200
    assert 'name="memory_mib"' in form.content.decode()


def test_bad_input_gets_field_errors_and_makes_nothing(
    user_client: Client, template: GuestTemplate
) -> None:
    response = user_client.post(
        f"/guests/new?template={template.pk}",
        {
            "template": template.pk,
            "name": "bad name!",
            "vcpus": 99,
            "memory_mib": 1,
            "disk_mib": 64,
        },
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "Pick between 1 and 4" in body
    assert "Pick between 128 and 4096" in body
    assert ProvisioningRequest.objects.count() == 0
    assert Guest.objects.count() == 0


def test_a_request_page_partial_stops_polling_when_final(
    user_client: Client, user, template
) -> None:
    req = ProvisioningRequest.objects.create(
        owner=user,
        template=template,
        template_version=1,
        name="x",
        vcpus=1,
        memory_mib=256,
        disk_mib=64,
        status=ProvisioningRequest.Status.FAILED,
        error="boom",
    )
    assert user_client.get(f"/requests/{req.pk}/").status_code == 200
    partial = user_client.get(f"/requests/{req.pk}/", HTTP_HX_REQUEST="true")
    assert partial.status_code == 286
    assert "boom" in partial.content.decode()


def test_the_guest_page_offers_only_the_actions_its_state_allows(
    user_client: Client, guest: Guest
) -> None:
    body = user_client.get(f"/guests/{guest.uuid}/").content.decode()
    assert 'data-action="suspend"' in body
    assert 'data-action="resume"' not in body
    assert 'data-action="start"' not in body


def test_an_action_the_state_refuses_is_explained_not_queued(
    user_client: Client, guest: Guest
) -> None:
    response = user_client.post(f"/guests/{guest.uuid}/actions/resume", follow=True)
    assert "Resume is not possible while web1 is running" in response.content.decode()
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    "url",
    ["/guests/{uuid}/", "/guests/{uuid}/events", "/requests/{req}/", "/requests/{req}/events"],
)
def test_other_users_get_404_for_my_objects(make_user, guest: Guest, template, url: str) -> None:
    req = ProvisioningRequest.objects.create(
        owner=guest.owner,
        template=template,
        template_version=1,
        name="x",
        vcpus=1,
        memory_mib=256,
        disk_mib=64,
        guest=guest,
    )
    other = Client()
    other.force_login(make_user("mallory"))
    assert other.get(url.format(uuid=guest.uuid, req=req.pk)).status_code == 404
    for post in (f"/guests/{guest.uuid}/actions/suspend", f"/requests/{req.pk}/cancel"):
        assert other.post(post).status_code == 404


def test_a_post_without_the_csrf_token_is_refused(user, guest: Guest) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(f"/guests/{guest.uuid}/actions/suspend")
    assert response.status_code == 403
    assert Job.objects.count() == 0


def test_pages_send_the_csrf_token_with_every_htmx_request(user_client: Client, guest) -> None:
    body = user_client.get("/").content.decode()
    assert 'hx-headers=\'{"X-CSRFToken": "' in body


@pytest.mark.parametrize(
    "url",
    [
        "/guests/{uuid}/rebuild",
        "/guests/{uuid}/schedules",
        "/guests/{uuid}/migrate",
        "/guests/{uuid}/jobs/1/cancel",
        "/guests/{uuid}/actions/delete",
    ],
)
def test_other_users_get_404_for_every_action_on_my_guest(make_user, guest: Guest, url) -> None:
    other = Client()
    other.force_login(make_user("mallory"))
    assert other.post(url.format(uuid=guest.uuid)).status_code == 404
    assert Job.objects.count() == 0


def test_migration_is_for_staff_only(user_client: Client, guest: Guest) -> None:
    assert user_client.post(f"/guests/{guest.uuid}/migrate").status_code == 404
    assert 'data-action="migrate"' not in user_client.get(f"/guests/{guest.uuid}/").content.decode()


def test_head_answers_on_the_pages_as_get_does_without_a_body(
    user_client: Client, guest: Guest, template: GuestTemplate
) -> None:
    pages = ["/", f"/guests/{guest.uuid}/", f"/guests/new?template={template.pk}", "/api/v1/docs"]
    for path in [*pages, "/healthz"]:  # the health check says 503 here: no listener runs
        got, head = user_client.get(path), user_client.head(path)
        assert head.status_code == got.status_code, path
        assert got.status_code == (200 if path in pages else 503), path
        assert head.content == b"" and head["Content-Type"] == got["Content-Type"], path
    assert Client().head("/").status_code == 302  # still behind the login
