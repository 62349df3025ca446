"""Work for a guest runs on its host's queue, taken only by that host's worker.

Two hosts on libvirt's test driver: a is this process's own daemon's, b the second daemon's (its
own state, so a domain made on b is not on a). One worker serves hv.a, another hv.b. Which worker
ran a task is read from the workers' own logs ("Task ...[<id>] received") for the ids this process
published.
"""

# ruff: noqa: F811 - the tests take the fixtures imported below as arguments

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from django.contrib.auth.models import User

from provisioning.hypervisor import domxml, operations
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services import provision
from provisioning.services.actions import guest_action
from provisioning.services.provision import Overrides, request_submit
from tests.factories import make_guest, make_host, make_template
from tests.support.hosts import SecondHost, second_libvirtd  # noqa: F401 - fixture
from tests.support.libvirt import TEST_POOL, TEST_URI
from tests.support.multihost import (
    HostStack,
    LoggedProc,
    Published,
    driver_uri_of,
    finished,
    host_stack,  # noqa: F401 - fixture
    new_guest_name,
    published,  # noqa: F401 - fixture
    remove_guests_on,
)
from tests.support.stack import wait_until

pytestmark = pytest.mark.timeout(180)
Status = ProvisioningRequest.Status


@dataclass
class DriverHosts:
    """Hosts a and b, each on its own daemon's test driver, with a connection held to each."""

    a: Host
    b: Host
    hv_a: Hypervisor
    hv_b: Hypervisor

    def hv(self, host: Host) -> Hypervisor:
        return self.hv_a if host.pk == self.a.pk else self.hv_b


@pytest.fixture
def driver_hosts(
    host_stack: HostStack,
    second_libvirtd: SecondHost,
) -> Iterator[DriverHosts]:
    uri_b = driver_uri_of(second_libvirtd)
    # Held open for the whole test: a test driver forgets everything when its last client leaves.
    hv_a, hv_b = get_hypervisor(TEST_URI), get_hypervisor(uri_b)
    assert operations.list_domains(hv_b) != [], f"{uri_b} does not answer as a test driver"
    a = make_host("a", uri=TEST_URI, roomy=False)
    b = make_host("b", uri=uri_b, roomy=False)
    hosts = DriverHosts(a, b, hv_a, hv_b)
    try:
        yield hosts
    finally:
        # The workers stop after this (host_stack outlives it); nothing of theirs is left on b.
        remove_guests_on([hv_a, hv_b], TEST_POOL, shared_storage=False)


def pinned_template(host: Host) -> GuestTemplate:
    """A kernel-install template pinned to host (the test driver never reads the paths)."""
    return make_template(name=f"Tiny on {host.name}", host=host, pinned_to=host)


def running_guest(hosts: DriverHosts, host: Host, owner: User) -> Guest:
    """A running, persistent domain on host's test driver and its portal row."""
    spec = domxml.GuestSpec(
        name=new_guest_name(),
        uuid=str(uuidlib.uuid4()),
        memory_mib=128,
        vcpus=1,
        method="import",
        disks=(domxml.DiskSpec(domxml.VolumeRef(TEST_POOL, "none.img"), format="raw"),),
    )
    hv = hosts.hv(host)
    operations.define(hv, domxml.final_xml(spec))
    info = operations.start(hv, spec.uuid)
    return make_guest(
        owner=owner,
        host=host,
        name=spec.name,
        uuid=spec.uuid,
        state=info.state.value,
        persistent=True,
        memory_mib=128,
    )


def wait_for(request: ProvisioningRequest, status: str, stack: HostStack) -> None:
    """Wait until the request reaches status (failing at once if it fails)."""

    def reached() -> bool:
        request.refresh_from_db()
        assert request.status != Status.FAILED, f"{request.error}\n{stack.logs()}"
        return request.status == status

    wait_until(reached, timeout=30, what=f"{request.name} {status}\n{stack.logs()}")


def finish_install(hosts: DriverHosts, request: ProvisioningRequest) -> None:
    """Play the installer powering off, and the listener noticing (done here, in the test)."""
    assert request.guest is not None and request.host is not None
    operations.shutdown(hosts.hv(request.host), str(request.guest.uuid))
    provision.request_domain_stopped(request.pk)


def ran_only_on(task_ids: list[str], worker: LoggedProc, other: LoggedProc) -> bool:
    """Every task was taken by worker, none by other."""
    return all(worker.received(t) for t in task_ids) and not any(
        other.received(t) for t in task_ids
    )


def test_each_hosts_provisioning_and_jobs_run_only_on_its_own_worker(
    driver_hosts: DriverHosts,
    host_stack: HostStack,
    published: Published,
    make_user,
) -> None:
    hosts = driver_hosts
    owner = make_user("ann")
    worker_a = host_stack.worker(hosts.a)
    worker_b = host_stack.worker(hosts.b)

    on_a = request_submit(
        owner=owner, template=pinned_template(hosts.a), overrides=Overrides(name=new_guest_name())
    )
    on_b = request_submit(
        owner=owner, template=pinned_template(hosts.b), overrides=Overrides(name=new_guest_name())
    )
    for request in (on_a, on_b):
        wait_for(request, Status.WAITING, host_stack)
    assert on_a.guest is not None and on_b.guest is not None
    uuid_a, uuid_b = str(on_a.guest.uuid), str(on_b.guest.uuid)
    # Each installer runs on its own host's daemon, and only there.
    assert operations.get_info(hosts.hv_a, uuid_a).active
    assert operations.get_info(hosts.hv_b, uuid_b).active
    assert not operations.get_info(hosts.hv_a, uuid_b).exists
    assert not operations.get_info(hosts.hv_b, uuid_a).exists

    for request in (on_a, on_b):
        finish_install(hosts, request)
    for request in (on_a, on_b):
        wait_for(request, Status.RUNNING, host_stack)
    jobs = [
        guest_action(guest=Guest.objects.get(uuid=u), kind=Job.Kind.SUSPEND, by=owner)
        for u in (uuid_a, uuid_b)
    ]
    for job in jobs:
        assert finished(job, 30).status == Job.Status.SUCCEEDED, f"{job.error}\n{host_stack.logs()}"

    to_a, to_b = published.to("hv.a"), published.to("hv.b")
    # Two steps of each install (submit, then after the installer) and the suspend job.
    assert (
        [s.name for s in to_a]
        == [s.name for s in to_b]
        == [
            "provisioning.advance_request",
            "provisioning.advance_request",
            "provisioning.run_job",
        ]
    )
    assert {s.args for s in to_b} == {f"({on_b.pk},)", f"({jobs[1].pk},)"}
    assert not [s for s in published.sent if s.queue not in ("hv.a", "hv.b")]
    assert ran_only_on([s.id for s in to_a], worker_a, worker_b)
    assert ran_only_on([s.id for s in to_b], worker_b, worker_a)
    assert operations.get_info(hosts.hv_b, uuid_b).state == GuestState.PAUSED
    assert operations.get_info(hosts.hv_a, uuid_a).state == GuestState.PAUSED


def queued_messages(stack: HostStack, queue: str) -> int:
    """Messages waiting in the broker for a queue (kombu keeps each queue as a Redis list)."""
    client = redis.Redis.from_url(stack.redis.url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def test_a_hosts_jobs_wait_for_its_worker_while_other_hosts_run(
    driver_hosts: DriverHosts,
    host_stack: HostStack,
    published: Published,
    make_user,
) -> None:
    hosts = driver_hosts
    owner = make_user("ann")
    guest_a = running_guest(hosts, hosts.a, owner)
    guest_b = running_guest(hosts, hosts.b, owner)
    worker_a = host_stack.worker(hosts.a)
    worker_b = host_stack.worker(hosts.b)
    host_stack.stop(worker_b)  # b's worker goes away; b's libvirt stays up

    job_b = guest_action(guest=guest_b, kind=Job.Kind.SUSPEND, by=owner)
    job_a = guest_action(guest=guest_a, kind=Job.Kind.SUSPEND, by=owner)
    done_a = finished(job_a, 30)
    assert done_a.status == Job.Status.SUCCEEDED, f"{done_a.error}\n{host_stack.logs()}"

    # a's job, queued after b's, is done; b's waits in b's queue, untouched.
    job_b.refresh_from_db()
    assert job_b.status == Job.Status.QUEUED
    assert queued_messages(host_stack, "hv.b") == 1
    assert operations.get_info(hosts.hv_b, str(guest_b.uuid)).state == GuestState.RUNNING
    assert operations.get_info(hosts.hv_a, str(guest_a.uuid)).state == GuestState.PAUSED

    back = host_stack.worker(hosts.b)
    done_b = finished(job_b, 30)
    assert done_b.status == Job.Status.SUCCEEDED, f"{done_b.error}\n{host_stack.logs()}"

    [sent_b] = published.to("hv.b")
    [sent_a] = published.to("hv.a")
    assert sent_b.args == f"({job_b.pk},)"
    assert back.received(sent_b.id)
    assert not worker_a.received(sent_b.id)
    assert worker_a.received(sent_a.id)
    assert queued_messages(host_stack, "hv.b") == 0
    assert operations.get_info(hosts.hv_b, str(guest_b.uuid)).state == GuestState.PAUSED
    guest_b.refresh_from_db()
    assert guest_b.state == Guest.State.PAUSED
