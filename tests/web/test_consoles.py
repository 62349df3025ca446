"""Who may open a guest's console, and how refusals look: before any guest byte, a close code.

The consumers run in this process on the real ASGI application (Channels' communicator) with
the real session authentication; the guest rows sit on this run's libvirt test driver, which
has no consoles, so a console let in here ends as "unavailable" rather than streaming.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from provisioning.models import ConsoleSession, Guest
from provisioning.services import consoles
from tests.factories import make_guest, make_host, make_user
from tests.support.consoles import Viewer, history, run_async, session_cookie, token_for
from vmportal.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def owner():
    return make_user("ann")


@pytest.fixture
def guest(owner) -> Guest:
    make_host()
    return make_guest(owner=owner, state=Guest.State.RUNNING)


def refused(guest: Guest, token: str, **kwargs: object) -> tuple[tuple[int, str], Viewer]:
    """Open the socket and wait for its close; return (code, reason) and the viewer."""

    async def go() -> tuple[tuple[int, str], Viewer]:
        viewer = Viewer(application, guest.uuid, token, **kwargs)  # type: ignore[arg-type]
        assert await viewer.connect(), "refusals accept first, so the code reaches the page"
        close = await viewer.closed()
        await viewer.leave()
        return close, viewer

    return run_async(go)


def assert_nothing_sent(viewer: Viewer) -> None:
    assert viewer.output == b"" and viewer.statuses == []


# --- minting (the page's POST) ---


def test_the_page_mints_a_token_and_names_the_socket(client, owner, guest) -> None:
    client.force_login(owner)
    answer = client.post(f"/guests/{guest.uuid}/console/serial/token")
    assert answer.status_code == 200
    body = answer.json()
    assert body["url"] == f"/ws/guests/{guest.uuid}/console/serial?token={body['token']}"
    row = ConsoleSession.objects.get()
    assert row.token_hash != body["token"] and len(row.token_hash) == 64, "stored hashed"
    assert row.opened is None and row.expires > timezone.now()


def test_minting_needs_a_sign_in_the_owner_or_staff_and_a_running_guest(client, guest) -> None:
    assert client.post(f"/guests/{guest.uuid}/console/serial/token").status_code == 302
    client.force_login(make_user("bob"))
    assert client.post(f"/guests/{guest.uuid}/console/serial/token").status_code == 404
    client.force_login(make_user("root", staff=True))
    assert client.post(f"/guests/{guest.uuid}/console/graphics/token").status_code == 200
    assert client.post(f"/guests/{guest.uuid}/console/nonsense/token").status_code == 404
    Guest.objects.filter(pk=guest.pk).update(state=Guest.State.DEFINED)
    answer = client.post(f"/guests/{guest.uuid}/console/serial/token")
    assert answer.status_code == 409 and "stopped" in answer.json()["error"]
    assert client.get(f"/guests/{guest.uuid}/console/serial/token").status_code == 405


# --- the socket's refusals ---


def test_a_socket_without_a_session_is_refused(guest, owner) -> None:
    (code, reason), viewer = refused(guest, token_for(guest, owner))
    assert code == consoles.NOT_SIGNED_IN and "sign in" in reason
    assert_nothing_sent(viewer)


def test_a_foreign_users_session_is_refused_even_with_the_owners_token(guest, owner) -> None:
    token = token_for(guest, owner)
    (code, reason), viewer = refused(guest, token, cookie=session_cookie(make_user("bob")))
    assert code == consoles.NO_SUCH_GUEST and reason == "no such guest"
    assert_nothing_sent(viewer)
    assert ConsoleSession.objects.get().opened is None, "the owner's token is not spent"


def test_a_wrong_or_missing_origin_is_refused(guest, owner) -> None:
    cookie = session_cookie(owner)
    for origin in ("http://evil.example", "http://127.0.0.1:9999", None):
        (code, reason), viewer = refused(
            guest, token_for(guest, owner), cookie=cookie, origin=origin
        )
        assert code == consoles.BAD_ORIGIN and reason.startswith("origin not allowed"), origin
        assert_nothing_sent(viewer)
    assert not ConsoleSession.objects.filter(opened__isnull=False).exists()


def test_an_unknown_token_is_refused(guest, owner) -> None:
    (code, reason), viewer = refused(guest, "made-up", cookie=session_cookie(owner))
    assert code == consoles.BAD_TOKEN and "unknown" in reason
    assert_nothing_sent(viewer)


def test_a_token_for_another_console_or_guest_is_refused(guest, owner) -> None:
    other = make_guest(owner=owner, state=Guest.State.RUNNING)
    cookie = session_cookie(owner)
    (code, _), _ = refused(guest, token_for(guest, owner, "graphics"), cookie=cookie)
    assert code == consoles.BAD_TOKEN
    (code, _), _ = refused(guest, token_for(other, owner), cookie=cookie)
    assert code == consoles.BAD_TOKEN


def test_an_expired_token_is_refused(guest, owner) -> None:
    token = token_for(guest, owner)
    ConsoleSession.objects.update(expires=timezone.now() - timedelta(seconds=1))
    (code, reason), viewer = refused(guest, token, cookie=session_cookie(owner))
    assert code == consoles.BAD_TOKEN and "expired" in reason
    assert_nothing_sent(viewer)


def test_a_replayed_token_is_refused(guest, owner) -> None:
    token = token_for(guest, owner)
    cookie = session_cookie(owner)
    first, _ = refused(guest, token, cookie=cookie)
    # The test driver has no serial consoles: let in, then closed as unavailable.
    assert first[0] == consoles.UNAVAILABLE and "unavailable" in first[1]
    (code, reason), viewer = refused(guest, token, cookie=cookie)
    assert code == consoles.BAD_TOKEN and "used already" in reason
    assert_nothing_sent(viewer)
    [session] = history(guest)
    assert session.closed is not None and "unavailable" in session.close_reason


def test_a_guest_that_is_not_running_is_refused(guest, owner) -> None:
    token = token_for(guest, owner)
    Guest.objects.filter(pk=guest.pk).update(state=Guest.State.DEFINED)
    (code, reason), viewer = refused(guest, token, cookie=session_cookie(owner))
    assert code == consoles.NOT_RUNNING and "not running" in reason
    assert_nothing_sent(viewer)


def test_a_guest_page_offers_both_consoles_and_lists_the_sessions(client, owner, guest) -> None:
    token = token_for(guest, owner)
    refused(guest, token, cookie=session_cookie(owner))
    client.force_login(owner)
    page = client.get(f"/guests/{guest.uuid}/").content.decode()
    assert "data-terminal" in page and "data-screen" in page
    assert "vendor/xterm/xterm.js" in page and "js/screen.js" in page
    assert "Console sessions" in page and "Serial terminal" in page
    full = client.get(f"/guests/{guest.uuid}/console/serial/")
    assert full.status_code == 200 and b"data-terminal" in full.content
    assert client.get(f"/guests/{guest.uuid}/console/other/").status_code == 404
