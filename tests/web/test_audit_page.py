"""The staff's audit page: the log newest first, filters, pages, and the filtered rows as CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import Client
from django.utils import timezone

from provisioning.models import AuditEvent

pytestmark = pytest.mark.django_db
AUDIT = "/audit/"
EXPORT = "/audit/export.csv"


def event(action: str, *, days_ago: float = 0, **fields: object) -> AuditEvent:
    """A row as a service would have written it, `days_ago` days old."""
    values: dict[str, object] = {"channel": AuditEvent.Channel.WEB, "action": action, **fields}
    row = AuditEvent.objects.create(**values)
    if days_ago:
        when = timezone.now() - timedelta(days=days_ago)
        AuditEvent.objects.filter(pk=row.pk).update(created=when)
        row.refresh_from_db()
    return row


@pytest.fixture
def auditor(staff_client: Client) -> Client:
    """A staff member's client, with the log emptied of its own login (force_login writes one)."""
    AuditEvent.objects.all().delete()
    return staff_client


@pytest.fixture
def rows(user) -> dict[str, AuditEvent]:
    return {
        "suspend": event(
            "guest.suspend",
            actor=user,
            actor_name="alice",
            object_type="guest",
            object_id="2b1c",
            object_repr="web1",
            source_ip="192.0.2.10",
            days_ago=3,
        ),
        "admin": event(
            "admin.host.change",
            channel=AuditEvent.Channel.ADMIN,
            actor_name="root-admin",
            object_type="host",
            object_id="7",
            object_repr="local",
            changes={"enabled": [True, False]},
            days_ago=1,
        ),
        "refused": event(
            "request.create",
            actor=user,
            actor_name="alice",
            channel=AuditEvent.Channel.API,
            token_name="ci",
            object_repr="db1",
            result=AuditEvent.Result.REFUSED,
            detail="over the quota",
        ),
    }


def shown(response) -> list[int]:
    """The ids of the rows on the page, top to bottom."""
    return [event.pk for event in response.context["page"].object_list]


def csv_of(response) -> list[list[str]]:
    assert isinstance(response, StreamingHttpResponse)

    async def read() -> bytes:
        return b"".join([part async for part in response.streaming_content])

    return list(csv.reader(io.StringIO(async_to_sync(read)().decode())))


# --- who may see it ---


def test_anonymous_visitors_are_sent_to_log_in() -> None:
    for url in (AUDIT, EXPORT):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_users_who_are_not_staff_get_404(user_client: Client, rows) -> None:
    assert user_client.get(AUDIT).status_code == 404
    assert user_client.get(EXPORT).status_code == 404


def test_only_staff_get_the_nav_link(staff_client: Client, user_client: Client) -> None:
    assert f'href="{AUDIT}"' in staff_client.get("/").content.decode()
    assert f'href="{AUDIT}"' not in user_client.get("/").content.decode()


# --- the page ---


def test_staff_see_every_row_newest_first(auditor: Client, rows) -> None:
    response = auditor.get(AUDIT)
    assert response.status_code == 200
    assert shown(response) == [rows["refused"].pk, rows["admin"].pk, rows["suspend"].pk]
    body = response.content.decode()
    assert "guest.suspend" in body and "192.0.2.10" in body
    assert "over the quota" in body and "token ci" in body
    assert "<code>enabled</code>: True → False" in body


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"actor": "ALICE"}, ["refused", "suspend"]),
        ({"channel": "admin"}, ["admin"]),
        ({"action": "guest."}, ["suspend"]),
        ({"action": "admin"}, ["admin"]),
        ({"action": "suspend"}, []),  # a prefix, not a substring
        ({"object_type": "host", "object": "7"}, ["admin"]),
        ({"object": "WEB"}, ["suspend"]),  # part of the name
        ({"object": "2b1c"}, ["suspend"]),  # the id
        ({"result": "refused"}, ["refused"]),
        ({"actor": "alice", "result": "ok"}, ["suspend"]),
    ],
)
def test_the_filters_narrow_the_rows(auditor: Client, rows, filters, expected) -> None:
    response = auditor.get(AUDIT, filters)
    assert response.status_code == 200
    assert shown(response) == [rows[name].pk for name in expected]


def test_the_date_filters_take_whole_days(auditor: Client, rows) -> None:
    today = timezone.localdate()
    two_days_ago = str(today - timedelta(days=2))
    since = auditor.get(AUDIT, {"since": two_days_ago})
    assert shown(since) == [rows["refused"].pk, rows["admin"].pk]
    until = auditor.get(AUDIT, {"until": two_days_ago})
    assert shown(until) == [rows["suspend"].pk]
    one_day = auditor.get(AUDIT, {"since": str(today), "until": str(today)})
    assert shown(one_day) == [rows["refused"].pk]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"since": "yesterday"}, "Enter a valid date."),
        ({"until": "2024-02-30"}, "Enter a valid date."),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "Pick a day on or after the first day."),
        ({"until": "9999-12-31"}, "Pick a day from 1970-01-01 to 9998-12-31."),
        ({"channel": "carrier-pigeon"}, "Select a valid choice."),
    ],
)
def test_bad_filters_are_explained_not_a_500(auditor: Client, rows, filters, message) -> None:
    response = auditor.get(AUDIT, filters)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert shown(response) == []
    export = auditor.get(EXPORT, filters)
    assert export.status_code == 400
    assert message in export.content.decode()


def test_rows_come_50_a_page_and_the_pager_keeps_the_filters(auditor: Client) -> None:
    for n in range(120):
        event(f"thing.{n}", actor_name="bob")
    event("thing.other", actor_name="carol")
    first = auditor.get(AUDIT, {"actor": "bob"})
    assert len(shown(first)) == 50
    assert first.context["page"].paginator.count == 120
    assert 'href="?actor=bob&amp;page=2"' in first.content.decode()
    last = auditor.get(AUDIT, {"actor": "bob", "page": 3})
    assert len(shown(last)) == 20
    assert auditor.get(AUDIT, {"page": "nonsense"}).status_code == 200


def test_the_page_queries_do_not_grow_with_the_rows(
    auditor: Client, user, django_assert_max_num_queries
) -> None:
    for n in range(50):
        event(f"thing.{n}", actor=user, actor_name="alice", token_name="ci")
    with django_assert_max_num_queries(4):  # session, user, count, the page's rows
        response = auditor.get(AUDIT)
    assert len(shown(response)) == 50


def test_htmx_gets_only_the_table(auditor: Client, rows) -> None:
    response = auditor.get(AUDIT, {"channel": "admin"}, HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="audit-table">')
    assert "<html" not in body and "admin.host.change" in body


def test_the_export_link_carries_the_filters(auditor: Client, rows) -> None:
    body = auditor.get(AUDIT, {"channel": "admin", "page": 1}).content.decode()
    assert f'href="{EXPORT}?channel=admin"' in body


# --- the CSV ---


def test_the_csv_has_a_header_and_the_filtered_rows(auditor: Client, rows) -> None:
    response = auditor.get(EXPORT, {"actor": "alice"})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    assert response["Content-Disposition"].startswith('attachment; filename="audit-')
    assert response.is_async  # the ASGI server streams it, not collects it first
    header, *lines = csv_of(response)
    assert header == [
        "created",
        "actor",
        "channel",
        "token",
        "source_ip",
        "action",
        "object_type",
        "object_id",
        "object_repr",
        "result",
        "changes",
        "detail",
    ]
    refused, suspend = lines
    assert refused[1:] == [
        "alice",
        "api",
        "ci",
        "",
        "request.create",
        "",
        "",
        "db1",
        "refused",
        "",
        "over the quota",
    ]
    assert refused[0] == rows["refused"].created.isoformat()
    assert suspend[4:6] == ["192.0.2.10", "guest.suspend"]


def test_the_csv_keeps_changes_as_json(auditor: Client, rows) -> None:
    _header, line = csv_of(auditor.get(EXPORT, {"channel": "admin"}))
    assert json.loads(line[10]) == {"enabled": [True, False]}


def test_csv_cells_that_would_run_as_formulas_are_quoted(auditor: Client) -> None:
    event(
        "login_failed",
        detail='=HYPERLINK("http://evil.example","x")',
        object_repr="+1+cmd|' /C calc'!A0",
        actor_name="@alice",
        object_id="-2",
    )
    _header, line = csv_of(auditor.get(EXPORT))
    assert line[1] == "'@alice"
    assert line[7] == "'-2"
    assert line[8] == "'+1+cmd|' /C calc'!A0"
    assert line[11] == '\'=HYPERLINK("http://evil.example","x")'


def test_the_csv_streams_every_row_in_chunks(auditor: Client, monkeypatch) -> None:
    from provisioning import views

    monkeypatch.setattr(views, "AUDIT_CSV_CHUNK", 7)
    made = [event(f"thing.{n}") for n in range(30)]
    # Rows created in the same instant are still each sent once, newest (highest id) first.
    AuditEvent.objects.update(created=timezone.now())
    _header, *lines = csv_of(auditor.get(EXPORT))
    assert [line[5] for line in lines] == [row.action for row in reversed(made)]
