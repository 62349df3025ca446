"""Idempotency-Key on POST /requests: a retry answers the first request, never makes a second,
including 20 retries at once against real web servers."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from provisioning.models import Guest, IdempotencyKey, ProvisioningRequest
from tests.api.conftest import World, assert_problem, build_world, call
from tests.support.stack import start_web

pytestmark = pytest.mark.usefixtures("api_test")
API = "/api/v1"
KEY = "retry-7f3a"
ROUNDS = 5


def ask(world: World, body: dict[str, Any], *, key: str = KEY, caller: str = "owner") -> Any:
    return call(
        "POST",
        f"{API}/requests",
        token=world.token(caller),
        body={"template": world.template.pk, **body},
        headers={"Idempotency-Key": key},
    )


def test_the_same_key_and_body_twice_make_one_request_and_replay_it(world: World) -> None:
    first = ask(world, {"name": "once"})
    again = ask(world, {"name": "once"})

    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first
    assert again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again["Location"] == first["Location"]
    assert ProvisioningRequest.objects.filter(name="once").count() == 1
    assert Guest.objects.filter(name="once").count() == 1


def test_the_same_key_with_another_body_is_refused_and_makes_nothing(world: World) -> None:
    assert ask(world, {"name": "once"}).status_code == 202

    other = ask(world, {"name": "twice"})

    problem = assert_problem(other, 422)
    assert "Idempotency-Key" in problem["detail"]
    assert not ProvisioningRequest.objects.filter(name="twice").exists()


def test_a_key_whose_first_try_was_refused_by_the_service_can_be_used_again(
    world: World,
) -> None:
    most = world.template.size_range("vcpus")[2]
    assert_problem(ask(world, {"name": "sized", "vcpus": most + 1}), 422)
    assert not IdempotencyKey.objects.exists()

    fixed = ask(world, {"name": "sized", "vcpus": most})

    assert fixed.status_code == 202, fixed.content[:500]
    assert "Idempotent-Replayed" not in fixed
    assert ProvisioningRequest.objects.get(name="sized").vcpus == most


def test_a_key_whose_first_try_had_a_bad_name_can_be_used_again(world: World) -> None:
    assert_problem(ask(world, {"name": "bad name"}), 422)

    fixed = ask(world, {"name": "good-name"})

    assert fixed.status_code == 202, fixed.content[:500]
    assert ProvisioningRequest.objects.filter(name="good-name").count() == 1


def test_a_key_whose_name_was_taken_can_be_used_again_once_the_name_is_free(
    world: World,
) -> None:
    assert_problem(ask(world, {"name": "alice-web"}), 422)  # her running guest's name
    Guest.objects.filter(pk=world.guest.pk).update(state=Guest.State.UNDEFINED)

    retried = ask(world, {"name": "alice-web"})

    assert retried.status_code == 202, retried.content[:500]
    assert "Idempotent-Replayed" not in retried


def test_keys_are_each_users_own(world: World) -> None:
    alices = ask(world, {"name": "hers"})
    bobs = ask(world, {"name": "his"}, caller="foreign")
    assert (alices.status_code, bobs.status_code) == (202, 202)
    assert "Idempotent-Replayed" not in bobs
    assert alices.json()["id"] != bobs.json()["id"]


@pytest.mark.parametrize("key", ["has space", "é", "x" * 256, ""])
def test_a_key_that_is_not_1_to_255_printable_ascii_is_refused(world: World, key: str) -> None:
    response = ask(world, {"name": "keyed"}, key=key)
    assert_problem(response, 422)
    assert not ProvisioningRequest.objects.filter(name="keyed").exists()


def test_without_a_key_a_second_post_is_tried_again_not_replayed(world: World) -> None:
    body = {"template": world.template.pk, "name": "plain"}
    first = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    second = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    assert first.status_code == 202
    # The name is taken by then: the second is refused, not replayed.
    assert_problem(second, 422)


# --- 20 retries at once, against real web servers ---

SERVERS = 4
RETRIES = 20


@dataclass
class Servers:
    """Several web processes on the test's database: retries race in the database, not only
    between one process's threads."""

    world: World
    bases: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.world.token('owner')}"}

    def at_once(self, key: str, body: dict[str, Any]) -> list[requests.Response]:
        """RETRIES posts of the same key and body at the same moment, spread over the servers."""
        headers = {**self.auth, "Idempotency-Key": key}
        sent = {"template": self.world.template.pk, **body}
        start = threading.Barrier(RETRIES)
        answers: dict[int, requests.Response | BaseException] = {}

        def retry(n: int) -> None:
            url = f"{self.bases[n % len(self.bases)]}{API}/requests"
            with requests.Session() as session:
                try:
                    start.wait(timeout=30)
                    answers[n] = session.post(url, json=sent, headers=headers, timeout=60)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    answers[n] = exc

        threads = [threading.Thread(target=retry, args=(n,)) for n in range(RETRIES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        failed = [a for a in answers.values() if isinstance(a, BaseException)]
        assert not failed, failed
        assert len(answers) == RETRIES
        return [a for a in answers.values() if isinstance(a, requests.Response)]


@pytest.fixture
def servers(stack) -> Servers:
    world = build_world()
    bases = []
    for n in range(SERVERS):
        stack.procs[f"web-{n}"], base = start_web(stack.env, name=f"web-{n}")
        bases.append(base)
    running = Servers(world, bases)
    for base in bases:
        # A first call of its own to each server: the rate limiter's first calls in a new process
        # race (test_conventions' test_the_first_calls_a_new_process_serves_at_once_all_count).
        answer = requests.get(f"{base}{API}/quota", headers=running.auth, timeout=30)
        assert answer.status_code == 200
    return running


def assert_told_to_retry(busy: requests.Response) -> None:
    """An in-flight duplicate: 409 problem details saying when to try again."""
    assert busy.status_code == 409
    assert busy.headers["Content-Type"] == "application/problem+json"
    assert busy.headers.get("Retry-After", "").isdigit(), busy.text


@pytest.mark.timeout(120)
def test_twenty_retries_at_once_make_one_request_and_one_guest(servers: Servers) -> None:
    answers = servers.at_once("race-1", {"name": "raced"})

    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {202, 409}, [(r.status_code, r.text[:200]) for r in answers]
    accepted = [r for r in answers if r.status_code == 202]
    assert accepted, statuses
    assert len({r.json()["id"] for r in accepted}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in accepted) == 1
    for busy in (r for r in answers if r.status_code == 409):
        assert_told_to_retry(busy)
    assert ProvisioningRequest.objects.filter(name="raced").count() == 1
    assert Guest.objects.filter(name="raced").count() == 1
    made = ProvisioningRequest.objects.get(name="raced")
    assert accepted[0].json()["id"] == made.pk
    assert IdempotencyKey.objects.get(key="race-1").request_id == made.pk
    # A retry once the dust settled answers the same request.
    again = requests.post(
        f"{servers.bases[0]}{API}/requests",
        json={"template": servers.world.template.pk, "name": "raced"},
        headers={**servers.auth, "Idempotency-Key": "race-1"},
        timeout=30,
    )
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == made.pk


@pytest.mark.timeout(120)
def test_twenty_retries_at_once_of_a_refused_request_are_refused_or_told_when_to_retry(
    servers: Servers,
) -> None:
    # alice-web is her running guest's name: each try that gets to the service is refused.
    answers = [
        answer
        for attempt in range(ROUNDS)
        for answer in servers.at_once(f"refused-{attempt}", {"name": "alice-web"})
    ]

    for answer in answers:
        assert answer.status_code in (409, 422), answer.text[:200]
        if answer.status_code == 409:
            assert_told_to_retry(answer)
    assert 422 in {a.status_code for a in answers}
    assert not ProvisioningRequest.objects.filter(name="alice-web").exists()
    # Every key was let go, so each can be used again.
    assert not IdempotencyKey.objects.exists()
