"""Idempotency-Key on POST /requests: a retry answers the first request, never makes a second,
including 20 retries at once against real web servers."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests

from provisioning.models import Guest, IdempotencyKey, ProvisioningRequest
from tests.api.conftest import World, assert_problem, build_world, call
from tests.support.stack import start_web

pytestmark = pytest.mark.usefixtures("api_test")
API = "/api/v1"
KEY = "retry-7f3a"


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


def test_without_a_key_each_post_is_a_new_request(world: World) -> None:
    body = {"template": world.template.pk, "name": "plain"}
    first = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    second = call("POST", f"{API}/requests", token=world.token("owner"), body=body)
    assert first.status_code == 202
    # The name is taken by then: the second is refused, not replayed.
    assert_problem(second, 422)


# --- 20 retries at once, against real web servers ---

SERVERS = 4
RETRIES = 20


@pytest.mark.timeout(120)
def test_twenty_retries_at_once_make_one_request_and_one_guest(stack) -> None:
    world = build_world()
    # Several processes: the retries race in the database, not only between one process's threads.
    bases = []
    for n in range(SERVERS):
        stack.procs[f"web-{n}"], base = start_web(stack.env, name=f"web-{n}")
        bases.append(base)
    auth = {"Authorization": f"Bearer {world.token('owner')}"}
    for base in bases:
        # A first call of its own to each server: the rate limiter's first calls in a new process
        # race (test_conventions' test_the_first_calls_a_new_process_serves_at_once_all_count).
        assert requests.get(f"{base}{API}/quota", headers=auth, timeout=30).status_code == 200
    body = {"template": world.template.pk, "name": "raced"}
    headers = {**auth, "Idempotency-Key": "race-1"}
    start = threading.Barrier(RETRIES)
    answers: list[requests.Response | BaseException] = [None] * RETRIES  # type: ignore[list-item]

    def retry(n: int) -> None:
        with requests.Session() as session:
            try:
                start.wait(timeout=30)
                answers[n] = session.post(
                    f"{bases[n % SERVERS]}{API}/requests", json=body, headers=headers, timeout=60
                )
            except BaseException as exc:  # noqa: BLE001 - reported below
                answers[n] = exc

    threads = [threading.Thread(target=retry, args=(n,)) for n in range(RETRIES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)

    failed = [a for a in answers if isinstance(a, BaseException)]
    assert not failed, failed
    responses: list[requests.Response] = answers  # type: ignore[assignment]
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {202, 409}, [(r.status_code, r.text[:200]) for r in responses]
    accepted = [r for r in responses if r.status_code == 202]
    assert accepted, statuses
    assert len({r.json()["id"] for r in accepted}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in accepted) <= 1
    for busy in (r for r in responses if r.status_code == 409):
        assert busy.headers["Content-Type"] == "application/problem+json"
        assert busy.headers["Retry-After"].isdigit(), busy.text
    assert ProvisioningRequest.objects.filter(name="raced").count() == 1
    assert Guest.objects.filter(name="raced").count() == 1
    made = ProvisioningRequest.objects.get(name="raced")
    assert accepted[0].json()["id"] == made.pk
    assert IdempotencyKey.objects.get(key="race-1").request_id == made.pk
