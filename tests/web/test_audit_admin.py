"""The admin keeps the audit log of what staff change there, and shows the log read only."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.forms import MultiWidget
from django.test import Client

from provisioning.models import ApiToken, AuditEvent, GuestTemplate, Host, Media
from provisioning.services import audit, tokens
from tests.factories import make_host, make_media, make_template, make_user
from tests.support.libvirt import TEST_URI

pytestmark = pytest.mark.django_db
LOG = "/admin/provisioning/auditevent/"


@pytest.fixture
def admin_client(superuser_client: Client) -> Client:
    """The superuser's client, with the log emptied of its own login (force_login writes one)."""
    AuditEvent.objects.all().delete()
    return superuser_client


@pytest.fixture
def template(settings) -> GuestTemplate:
    settings.LIBVIRT_URI = TEST_URI
    media = make_media(Media.Kind.KERNEL, kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd")
    return make_template(name="Tiny", host=make_host(), media=media, description="Small")


def form_data(client: Client, url: str, **changes: object) -> dict:
    """The admin form's current values at `url`, with changes, as the browser would post them."""
    form = client.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields}
    data.update(changes)
    posted: dict[str, object] = {}
    for name, value in data.items():
        widget = form.fields[name].widget
        if isinstance(widget, MultiWidget):  # a date and a time, say: one input each
            for suffix, part in zip(widget.widgets_names, widget.decompress(value), strict=True):
                if part is not None:
                    posted[name + suffix] = part
        elif value is True:
            posted[name] = "on"
        elif value is not None and value is not False:
            posted[name] = value
    return posted


def rows(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


# --- what staff change is recorded ---


def test_editing_a_template_records_the_fields_before_and_after(
    admin_client: Client, template: GuestTemplate
) -> None:
    url = f"/admin/provisioning/guesttemplate/{template.pk}/change/"
    data = form_data(admin_client, url, description="Now bigger", vcpus_max=2)
    response = admin_client.post(url, data, REMOTE_ADDR="198.51.100.4")
    assert response.status_code == 302, response.context["adminform"].form.errors
    (row,) = rows("admin.guesttemplate.change")
    assert row.changes == {"description": ["Small", "Now bigger"], "vcpus_max": [4, 2]}
    assert (row.channel, row.actor_name, row.source_ip) == ("admin", "admin", "198.51.100.4")
    assert (row.object_type, row.object_id) == ("guesttemplate", str(template.pk))
    assert row.object_repr.startswith("Tiny")
    assert row.result == "ok"


def test_adding_a_host_records_its_values(admin_client: Client) -> None:
    url = "/admin/provisioning/host/add/"
    data = form_data(admin_client, url, name="second", uri="test:///default", capacity_vcpus=3)
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    host = Host.objects.get(name="second")
    (row,) = rows("admin.host.add")
    assert row.object_id == str(host.pk) and row.channel == "admin"
    assert row.changes["name"] == [None, "second"]
    assert row.changes["capacity_vcpus"] == [None, 3]


def test_deleting_records_each_row_that_goes(admin_client: Client) -> None:
    one, two, three = (make_host(name, uri=f"test:///{name}") for name in ("h1", "h2", "h3"))
    response = admin_client.post(f"/admin/provisioning/host/{one.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    response = admin_client.post(
        "/admin/provisioning/host/",
        {"action": "delete_selected", "_selected_action": [two.pk, three.pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert not Host.objects.exists()
    gone = rows("admin.host.delete")
    assert sorted(row.object_repr for row in gone) == ["h1", "h2", "h3"]
    assert {row.actor_name for row in gone} == {"admin"}


def test_making_a_user_staff_is_recorded_and_a_password_never_is(admin_client: Client) -> None:
    bob = make_user("bob")
    # The admin's date and time inputs drop microseconds: saving would change date_joined.
    User.objects.filter(pk=bob.pk).update(date_joined=bob.date_joined.replace(microsecond=0))
    url = f"/admin/auth/user/{bob.pk}/change/"
    response = admin_client.post(url, form_data(admin_client, url, is_staff=True))
    assert response.status_code == 302, response.context["adminform"].form.errors
    (row,) = rows("admin.user.change")
    assert row.changes == {"is_staff": [False, True]}
    add = "/admin/auth/user/add/"
    admin_client.post(
        add,
        {
            "username": "carol",
            "usable_password": "true",
            "password1": "Another-good-pass-42",
            "password2": "Another-good-pass-42",
        },
    )
    (added,) = rows("admin.user.add")
    assert added.changes == {"username": [None, "carol"]}
    assert "Another-good-pass-42" not in str(AuditEvent.objects.values_list("changes", "detail"))


# --- the log itself is read only ---


@pytest.fixture
def logged() -> AuditEvent:
    with audit.acting(audit.Channel.WEB, ip="192.0.2.1"):
        return audit.record("guest.start", detail="job #1")


def test_staff_read_the_log_with_its_filters(staff_client: Client, logged: AuditEvent) -> None:
    listing = staff_client.get(LOG, {"channel__exact": "web", "q": "guest.start"})
    assert listing.status_code == 200
    assert list(listing.context["cl"].result_list) == [logged]
    filters = [spec.title for spec in listing.context["cl"].filter_specs]
    assert filters == ["channel", "result", "action"]
    assert staff_client.get(f"{LOG}{logged.pk}/change/").status_code == 200
    assert 'href="/admin/provisioning/auditevent/"' in staff_client.get("/admin/").content.decode()


def test_nobody_adds_changes_or_deletes_a_row_in_the_admin(
    admin_client: Client, logged: AuditEvent
) -> None:
    assert admin_client.get(f"{LOG}add/").status_code == 403
    assert admin_client.post(f"{LOG}add/", {"action": "forged"}).status_code == 403
    change = f"{LOG}{logged.pk}/change/"
    page = admin_client.get(change).content.decode()
    assert 'name="action"' not in page and "_save" not in page
    assert admin_client.post(change, {"action": "forged", "detail": "nothing"}).status_code == 403
    assert admin_client.get(f"{LOG}{logged.pk}/delete/").status_code == 403
    assert admin_client.post(f"{LOG}{logged.pk}/delete/", {"post": "yes"}).status_code == 403
    listing = admin_client.get(LOG)
    assert "delete_selected" not in listing.content.decode()
    logged.refresh_from_db()
    assert (logged.action, logged.detail) == ("guest.start", "job #1")
    assert AuditEvent.objects.filter(pk=logged.pk).exists()


# --- API tokens: read only, and revocable ---


def test_tokens_show_no_digest_and_staff_may_revoke_one(admin_client: Client) -> None:
    bob = make_user("bob")
    made = tokens.token_create(user=bob, name="ci", scope=ApiToken.Scope.WRITE, days=7)
    page = admin_client.get(f"/admin/provisioning/apitoken/{made.token.pk}/change/")
    assert page.status_code == 200
    assert made.token.digest not in page.content.decode()
    assert made.secret not in page.content.decode()
    assert admin_client.get("/admin/provisioning/apitoken/add/").status_code == 403
    response = admin_client.post(
        "/admin/provisioning/apitoken/",
        {"action": "revoke", "_selected_action": [made.token.pk]},
        follow=True,
    )
    assert "Revoked 1 token." in response.content.decode()
    made.token.refresh_from_db()
    assert made.token.revoked is not None
    # One row, naming who revoked it (not the owner, who did nothing).
    (revoked,) = rows("api_token.revoke")
    assert revoked.channel == "admin"
    assert revoked.actor == User.objects.get(username="admin")
    assert revoked.detail == "of bob"
    assert not rows("admin.apitoken.revoke")
