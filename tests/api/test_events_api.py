"""The API's live streams (server-sent events) against a real ASGI server: the first frame is
the thing as GET shows it, each change sends it again, and a final request closes its stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from provisioning.channels import guest_channel
from provisioning.services import stats
from tests.api.conftest import PROBLEM, World, build_world
from vmportal.heartbeat import client

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("api_test")]
API = "/api/v1"
# Longer than the streams' keepalive (15 s): a read that waits this long has truly stalled.
READ_TIMEOUT = 25


@dataclass(frozen=True)
class Frame:
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Live:
    world: World
    base: str

    def headers(self, caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.world.token(caller)}"}

    def get(self, path: str, caller: str = "owner") -> Any:
        response = requests.get(f"{self.base}{path}", headers=self.headers(caller), timeout=30)
        assert response.status_code == 200, response.text[:500]
        return response.json()

    def post(self, path: str, caller: str = "owner") -> requests.Response:
        return requests.post(f"{self.base}{path}", headers=self.headers(caller), timeout=30)

    def stream(self, path: str, caller: str | None = "owner") -> requests.Response:
        headers = self.headers(caller) if caller else {}
        return requests.get(
            f"{self.base}{path}", headers=headers, stream=True, timeout=(5, READ_TIMEOUT)
        )


@pytest.fixture
def live(stack) -> Live:
    world = build_world()
    stack.start("web")
    return Live(world, stack.base_url)


def frames(response: requests.Response) -> Iterator[Frame]:
    """The stream's frames as they come (keepalive comments skipped)."""
    buffer = ""
    for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            event, data = "message", []
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
            if data or event != "message":
                yield Frame(event, "\n".join(data))


def test_a_request_stream_shows_the_request_then_its_cancel_then_closes(live: Live) -> None:
    request = live.world.request
    url = f"{API}/requests/{request.pk}"
    with live.stream(f"{url}/events") as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        seen = frames(response)
        first = next(seen)
        assert first.event == "request"
        assert first.json() == live.get(url)
        assert first.json()["status"] not in ("cancelled", "running", "failed")

        cancelled = live.post(f"{url}/cancel")
        assert cancelled.status_code == 202, cancelled.text[:500]

        moved = next(seen)
        assert moved.event == "request"
        assert moved.json()["status"] == "cancelled"
        assert moved.json() == live.get(url)
        assert next(seen).event == "close"
        assert next(seen, None) is None, "the stream went on after close"


def test_a_stream_of_a_final_request_sends_it_once_and_closes(live: Live) -> None:
    request = live.world.request
    url = f"{API}/requests/{request.pk}"
    assert live.post(f"{url}/cancel").status_code == 202
    with live.stream(f"{url}/events") as response:
        assert [frame.event for frame in frames(response)] == ["request", "close"]


def test_a_guest_stream_shows_the_guest_then_each_change(live: Live) -> None:
    url = f"{API}/guests/{live.world.guest.uuid}"
    with live.stream(f"{url}/events") as response:
        assert response.status_code == 200
        seen = frames(response)
        first = next(seen)
        assert first.event == "guest"
        assert first.json() == live.get(url)
        assert "suspend" in first.json()["actions"]

        assert live.post(f"{url}/actions/suspend").status_code == 202

        moved = next(seen)
        assert moved.event == "guest"
        assert moved.json()["actions"] == []  # a job runs: nothing else may start
        assert moved.json() == live.get(url)


def test_a_guest_stream_sends_each_usage_point_and_still_each_change(live: Live) -> None:
    guest = live.world.guest
    url = f"{API}/guests/{guest.uuid}"
    try:
        with live.stream(f"{url}/events") as response:
            seen = frames(response)
            assert next(seen).event == "guest"

            stats.Store(interval=10).write([(str(guest.uuid), 1_000, (5.0, 1e6, 0, 0, 0, 0))])
            point = next(seen)
            assert point.event == "stats"
            assert point.json() == {
                "t": 1_000,
                "cpu": 5.0,
                "mem": 1e6,
                "disk_read": 0,
                "disk_write": 0,
                "net_rx": 0,
                "net_tx": 0,
            }
            # A point and a change arriving together: the point does not swallow the change.
            pipe = client().pipeline(transaction=False)
            pipe.publish(guest_channel(guest.uuid), json.dumps({"guest": str(guest.uuid)}))
            pipe.publish(guest_channel(guest.uuid), json.dumps({"stats": {"t": 1_010}}))
            pipe.execute()
            both = {next(seen).event, next(seen).event}
            assert both == {"stats", "guest"}
        assert live.get(f"{url}/stats")["t"] == [1_000]
    finally:
        stats.forget_guest(guest.uuid)


def test_staff_may_watch_anyones_request(live: Live) -> None:
    url = f"{API}/requests/{live.world.request.pk}"
    with live.stream(f"{url}/events", caller="staff") as response:
        assert response.status_code == 200
        assert next(frames(response)).json()["id"] == live.world.request.pk


@pytest.mark.parametrize(
    ("caller", "status"), [("foreign", 404), (None, 401), ("revoked", 401), ("expired", 401)]
)
@pytest.mark.parametrize("which", ["request", "guest"])
def test_a_caller_who_may_not_watch_gets_problem_details_not_a_stream(
    live: Live, which: str, caller: str | None, status: int
) -> None:
    thing = (
        f"requests/{live.world.request.pk}"
        if which == "request"
        else f"guests/{live.world.guest.uuid}"
    )
    with live.stream(f"{API}/{thing}/events", caller=caller) as response:
        assert response.status_code == status
        assert response.headers["Content-Type"] == PROBLEM
        problem = json.loads(response.content)
        assert problem["status"] == status
        assert b"alice" not in response.content
