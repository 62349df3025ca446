"""The usage graphs' data for pages and the API, and the dashboard's CPU sparklines."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from provisioning.models import Guest
from provisioning.services import stats, tokens
from tests.factories import make_guest, make_host, make_template, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def guest(user) -> Guest:
    made = make_guest(owner=user, template=make_template(name="Tiny", host=make_host()))
    store = stats.Store(interval=10)
    for i in range(40):
        store.write(
            [(str(made.uuid), 1_000_000 + 10 * i, (float(i), 5e7, 0.0, 512.0, None, None))],
            publish=False,
        )
    yield made
    stats.forget_guest(made.uuid)


def test_the_guest_page_has_its_graphs_and_their_data_url(user_client: Client, guest) -> None:
    body = user_client.get(f"/guests/{guest.uuid}/").content.decode()

    assert f'data-stats-url="/guests/{guest.uuid}/stats"' in body
    assert 'sse-swap="stats"' in body  # live points come on the page's one stream
    assert "vendor/uplot/uPlot.iife.min.js" in body and "js/graphs.js" in body
    for graph in ("cpu", "mem", "disk", "net"):
        assert f'data-graph="{graph}"' in body


def test_the_data_is_columns_oldest_first_for_the_range_asked(user_client: Client, guest) -> None:
    hour = user_client.get(f"/guests/{guest.uuid}/stats").json()
    day = user_client.get(f"/guests/{guest.uuid}/stats", {"range": "day"}).json()

    assert hour["range"] == "hour" and hour["step"] == 10.0
    assert hour["t"] == [1_000_000 + 10 * i for i in range(40)]
    assert hour["cpu"][:3] == [0.0, 1.0, 2.0] and hour["net_rx"][0] is None
    assert day["range"] == "day" and day["step"] == 120.0
    assert len(day["t"]) == len(day["cpu"]) >= 1


def test_an_unknown_range_is_a_clear_400_and_someone_elses_guest_a_404(
    user_client: Client, guest
) -> None:
    bad = user_client.get(f"/guests/{guest.uuid}/stats", {"range": "year"})
    stranger = Client()
    stranger.force_login(make_user())

    assert bad.status_code == 400 and "hour, day, week" in bad.json()["error"]
    assert stranger.get(f"/guests/{guest.uuid}/stats").status_code == 404
    assert Client().get(f"/guests/{guest.uuid}/stats").status_code == 302  # to log in


def test_staff_read_anyones_graphs(staff_client: Client, guest) -> None:
    assert staff_client.get(f"/guests/{guest.uuid}/stats").json()["t"]


def test_the_dashboard_draws_a_cpu_sparkline_for_sampled_guests_only(
    user, user_client: Client, guest
) -> None:
    quiet = make_guest(owner=user, template=guest.template, name="quiet")

    body = user_client.get("/").content.decode()

    row = re.search(rf'<tr id="guest-{guest.uuid}">.*?</tr>', body, re.S).group(0)
    points = re.search(r'<polyline points="([^"]+)"', row).group(1).split()
    assert len(points) == stats.SPARK_POINTS
    # CPU rose from 10 to 39 %: the line climbs (SVG's y grows downwards).
    assert float(points[0].split(",")[1]) > float(points[-1].split(",")[1])
    assert "39 %" in row
    quiet_row = re.search(rf'<tr id="guest-{quiet.uuid}">.*?</tr>', body, re.S).group(0)
    assert "<svg" not in quiet_row


def test_the_api_gives_the_same_series(user, guest) -> None:
    token = tokens.token_create(user=user, name="graphs", scope="read", days=1).secret
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

    answer = api.get(f"/api/v1/guests/{guest.uuid}/stats", {"range": "hour"})
    bad = api.get(f"/api/v1/guests/{guest.uuid}/stats", {"range": "year"})

    assert answer.status_code == 200
    assert answer.json()["t"] == [1_000_000 + 10 * i for i in range(40)]
    assert bad.status_code == 422 and bad["Content-Type"] == "application/problem+json"
