"""/healthz names every part and answers 503 when one is down, while the rest of the site serves."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support.libvirt import TEST_URI
from tests.support.stack import wait_until


def healthz(client: Client) -> tuple[int, dict]:
    response = client.get("/healthz")
    return response.status_code, response.json()


def test_every_part_is_ok_when_the_whole_stack_runs(stack, client: Client) -> None:
    stack.start("worker", "beat", "listener")

    def all_ok() -> dict | None:
        status, body = healthz(client)
        return body if status == 200 else None

    body = wait_until(all_ok, timeout=60, what="every part of /healthz to be ok", every=0.5)
    parts = body["parts"]
    assert set(parts) == {
        "database",
        "redis",
        "celery_workers",
        "celery_beat",
        "event_listener",
        "libvirt",
    }
    assert all(part["ok"] for part in parts.values())
    assert any("hv.local" in w["queues"] for w in parts["celery_workers"]["details"].values())
    libvirt = parts["libvirt"]["details"][TEST_URI]
    assert libvirt["reachable"] is True
    assert libvirt["lib_version"]


def test_nothing_running_is_reported_part_by_part(stack, client: Client) -> None:
    status, body = healthz(client)
    assert status == 503
    parts = body["parts"]
    assert parts["database"]["ok"] and parts["redis"]["ok"] and parts["libvirt"]["ok"]
    assert parts["celery_workers"]["reason"].startswith("no celery worker heartbeat")
    assert parts["celery_beat"]["reason"].startswith("no celery beat heartbeat")
    assert parts["event_listener"]["reason"].startswith("no event listener heartbeat")


def test_an_unreachable_libvirt_is_named(db: None, client: Client, settings) -> None:
    settings.LIBVIRT_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    status, body = healthz(client)
    assert status == 503
    libvirt = body["parts"]["libvirt"]
    assert libvirt["ok"] is False
    assert libvirt["reason"] == f"libvirt unreachable at {settings.LIBVIRT_URI}"
    assert libvirt["details"][settings.LIBVIRT_URI]["reachable"] is False


@pytest.mark.faults
def test_redis_stopped_gives_503_naming_redis_while_pages_still_serve(
    stack, client: Client, user_client: Client
) -> None:
    stack.start("worker")
    wait_until(
        lambda: healthz(client)[1]["parts"]["celery_workers"]["ok"],
        timeout=60,
        what="the worker's heartbeat",
    )
    stack.redis.stop()

    status, body = healthz(client)
    assert status == 503
    assert body["parts"]["redis"]["ok"] is False
    assert body["parts"]["redis"]["reason"].startswith(f"redis unreachable at {stack.redis.url}")
    assert body["parts"]["celery_workers"]["reason"].startswith("unknown: redis unreachable")
    assert body["parts"]["database"]["ok"] is True
    page = user_client.get("/")
    assert page.status_code == 200
    assert b"My guests" in page.content

    stack.redis.start()
    wait_until(
        lambda: healthz(client)[1]["parts"]["celery_workers"]["ok"],
        timeout=60,
        what="the worker to beat again after Redis came back",
    )
