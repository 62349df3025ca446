"""The API drives the tiny guest on real QEMU: create, follow to running, suspend, resume, delete.

The calls go through Django's test client in this process with a personal token, as a script
would send them; the worker and the event listener run as processes on this test's libvirtd
(tests/support/qemu_engine.py), and what the API answers is checked against libvirt itself.
"""

# ruff: noqa: F811 - the test takes the fixture imported below as an argument

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.types import GuestState
from provisioning.models import Job, ProvisioningRequest
from provisioning.services.tokens import token_create
from tests.support.qemu_engine import (
    BOOT_DEADLINE,
    INSTALL_DEADLINE,
    JOB_DEADLINE,
    QemuStack,
    qemu_stack,  # noqa: F401 - fixture
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

API = "/api/v1"
# Well under the API's 600 calls a minute for one token while a request is followed.
POLL_S = 0.2


def api_client(stack: QemuStack) -> Client:
    assert isinstance(stack.owner, User)
    secret = token_create(user=stack.owner, name="qemu test", scope="write", days=1).secret
    return Client(headers={"authorization": f"Bearer {secret}"})


def read(client: Client, url: str) -> dict[str, Any]:
    answer = client.get(url)
    assert answer.status_code == 200, answer.content
    body: dict[str, Any] = answer.json()
    return body


def follow(client: Client, url: str, final: frozenset[str], *, timeout: float) -> dict[str, Any]:
    """GET url until its status is final; the last answer."""

    def ended() -> dict[str, Any] | None:
        body = read(client, url)
        return body if body["status"] in final else None

    found = wait_until(ended, timeout=timeout, what=f"{url} to end", every=POLL_S)
    assert found is not None
    return found


def accepted(answer: Any, kind: str) -> dict[str, Any]:
    """A 202's body, its Location checked against the resource it names."""
    assert answer.status_code == 202, answer.content
    body: dict[str, Any] = answer.json()
    assert answer["Location"] == f"{API}/{kind}/{body['id']}" == body["url"]
    return body


def act(client: Client, stack: QemuStack, uuid: str, kind: str) -> dict[str, Any]:
    """Run a lifecycle action through the API and follow its job to the end."""
    job = accepted(client.post(f"{API}/guests/{uuid}/actions/{kind}"), "jobs")
    assert job["kind"] == kind and job["guest"] == uuid
    done = follow(client, job["url"], Job.FINAL, timeout=JOB_DEADLINE)
    assert done["status"] == Job.Status.SUCCEEDED, f"{done}\n{stack.logs()}"
    return done


def disk_volumes(stack: QemuStack, uuid: str) -> list[tuple[str, str]]:
    """The (pool, volume) of each disk in the guest's libvirt config."""
    root = domxml.parse_untrusted(operations.get_xml(stack.hv, uuid, inactive=True))
    sources = root.iterfind("devices/disk[@device='disk']/source")
    return [(str(s.get("pool")), str(s.get("volume"))) for s in sources if s.get("volume")]


def domain_active(stack: QemuStack, uuid: str) -> bool:
    return bool(stack.hv.call(lambda conn: conn.lookupByUUIDString(uuid).isActive()))


def test_the_api_creates_suspends_resumes_and_deletes_a_guest_on_qemu(
    qemu_stack: QemuStack,
) -> None:
    client = api_client(qemu_stack)
    body = {"template": qemu_stack.template.pk, "name": qemu_stack.new_name()}
    made = accepted(
        client.post(f"{API}/requests", body, content_type="application/json"), "requests"
    )
    # Accepted and under way: the worker may have taken it before the answer was written.
    assert made["status"] in ProvisioningRequest.ACTIVE and made["guest"]
    uuid = made["guest"]

    done = follow(
        client, made["url"], ProvisioningRequest.FINAL, timeout=INSTALL_DEADLINE + BOOT_DEADLINE
    )
    assert done["status"] == ProvisioningRequest.Status.RUNNING, f"{done}\n{qemu_stack.logs()}"
    guest = read(client, f"{API}/guests/{uuid}")
    assert guest["state"] == "running" and guest["name"] == body["name"]
    assert {"suspend", "shutdown", "delete"} <= set(guest["actions"])
    assert operations.get_info(qemu_stack.hv, uuid).state == GuestState.RUNNING
    assert domain_active(qemu_stack, uuid)
    volumes = disk_volumes(qemu_stack, uuid)
    assert volumes, "the guest has no disk volume in libvirt"

    act(client, qemu_stack, uuid, "suspend")
    assert read(client, f"{API}/guests/{uuid}")["state"] == "paused"
    assert operations.get_info(qemu_stack.hv, uuid).state == GuestState.PAUSED

    act(client, qemu_stack, uuid, "resume")
    assert read(client, f"{API}/guests/{uuid}")["state"] == "running"
    assert operations.get_info(qemu_stack.hv, uuid).state == GuestState.RUNNING

    job = accepted(client.delete(f"{API}/guests/{uuid}"), "jobs")
    assert job["kind"] == Job.Kind.DELETE
    done = follow(client, job["url"], Job.FINAL, timeout=JOB_DEADLINE)
    assert done["status"] == Job.Status.SUCCEEDED, f"{done}\n{qemu_stack.logs()}"
    assert not operations.get_info(qemu_stack.hv, uuid).exists
    for pool, volume in volumes:
        left = {v.name for v in storage.list_volumes(qemu_stack.hv, pool)}
        assert volume not in left, f"{pool}/{volume} is still in libvirt"
    gone = read(client, f"{API}/guests/{uuid}")
    assert gone["state"] == "undefined" and gone["actions"] == []
    listed = read(client, f"{API}/guests?limit=50")["items"]
    assert uuid not in {g["uuid"] for g in listed}
