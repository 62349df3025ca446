"""Helpers for the services' tests on this process's test driver: step-by-step driving, libvirt
look-ups, processes with logs of their own, and a host with room for many guests."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import traceback
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection

from provisioning import faults
from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.types import DomainInfo
from provisioning.models import Guest, GuestTemplate, Host, ProvisioningRequest
from provisioning.services import provision
from provisioning.services.provision import Overrides, request_submit
from tests import factories
from tests.support import stack as stack_mod
from tests.support.libvirt import TEST_POOL, TEST_URI
from tests.support.stack import Proc, wait_until

Status = ProvisioningRequest.Status
MiB = 1024 * 1024


def hv() -> Hypervisor:
    """This process's connection to its own test driver."""
    return get_hypervisor(TEST_URI)


def status_of(request: ProvisioningRequest) -> str:
    """The request's status as the database has it now."""
    request.refresh_from_db()
    return request.status


def volume_name(guest: Guest) -> str:
    """The name the engine gives a guest's disk volume."""
    return f"{guest.name}-{guest.uuid.hex[:8]}.qcow2"


def volumes_of(guest: Guest) -> list[str]:
    """Volumes in the test pool that belong to this guest (by the engine's naming)."""
    prefix = f"{guest.name}-{guest.uuid.hex[:8]}"
    return [v.name for v in storage.list_volumes(hv(), TEST_POOL) if v.name.startswith(prefix)]


def domains_named(name: str) -> list[DomainInfo]:
    """Domains on the test driver called `name` (libvirt allows at most one)."""
    return [d for d in operations.list_domains(hv()) if d.name == name]


def info_of(guest: Guest) -> DomainInfo:
    """What libvirt knows of the guest now."""
    return operations.get_info(hv(), str(guest.uuid))


def moves(request: ProvisioningRequest) -> list[tuple[str, str]]:
    """The request's recorded moves, oldest first."""
    return [(e.from_status, e.to_status) for e in request.events.order_by("created", "id")]


INSTALL_PATH = [
    "admitted",
    "preparing",
    "installing",
    "waiting",
    "defining",
    "starting",
    "running",
]
NO_INSTALL_PATH = ["admitted", "preparing", "defining", "starting", "running"]
# createXML only: nothing is defined, so the request never says it was.
TRANSIENT_PATH = ["admitted", "preparing", "starting", "running"]


def submit(owner: AbstractBaseUser, template: GuestTemplate, name: str, **kw: Any) -> Any:
    """Submit a request with the given overrides."""
    return request_submit(owner=owner, template=template, overrides=Overrides(name=name, **kw))  # type: ignore[arg-type]


def finish_installer(request: ProvisioningRequest) -> None:
    """Play 'the installer powered off' on the test driver (it applies on_poweroff at once)."""
    assert request.guest is not None
    operations.shutdown(hv(), str(request.guest.uuid))


class Stopped(Exception):
    """Raised at a fault checkpoint to stop an in-process step right after its side effects."""


@contextlib.contextmanager
def stop_at(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[None]:
    """Make faults.checkpoint(name) raise Stopped (in this process), as a crash would stop it."""
    real = faults.checkpoint

    def checkpoint(at: str) -> None:
        if at == name:
            raise Stopped(at)
        real(at)

    with monkeypatch.context() as patch:
        patch.setattr(faults, "checkpoint", checkpoint)
        yield


def advance_until(monkeypatch: pytest.MonkeyPatch, request_id: int, checkpoint: str) -> str:
    """Run the request's steps in this process until `checkpoint`; its status then."""
    with stop_at(monkeypatch, checkpoint), pytest.raises(Stopped):
        provision.advance(request_id)
    return ProvisioningRequest.objects.get(pk=request_id).status


def provision_running(
    owner: AbstractBaseUser, template: GuestTemplate, name: str, **overrides: Any
) -> Any:
    """A request taken to running in this process (no worker), through the installer."""
    request = submit(owner, template, name, **overrides)
    provision.advance(request.pk)
    if status_of(request) == Status.WAITING:
        finish_installer(request)
        provision.request_domain_stopped(request.pk)
        provision.advance(request.pk)
    assert status_of(request) == Status.RUNNING, request.error
    request.guest.refresh_from_db()
    return request


def in_threads(count: int, fn: Callable[[], object]) -> list[str]:
    """Run fn in `count` threads released together; the tracebacks of what they raised."""
    barrier = threading.Barrier(count)
    errors: list[str] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test to assert on
            errors.append("".join(traceback.format_exception(exc)))
        finally:
            connection.close()  # each thread has its own database connection

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


class Subscriber:
    """A Redis pub/sub listener collecting JSON messages in a background thread."""

    def __init__(self, url: str, pattern: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe(pattern)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        # Confirm the subscription before anything is published.
        wait_until(self._subscribed, timeout=5, what=f"subscription to {pattern}")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _subscribed(self) -> bool:
        message = self._pubsub.get_message(timeout=0.1)
        return bool(message and message["type"] == "psubscribe")

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                self.messages.append((message["channel"].decode(), json.loads(message["data"])))

    def on(self, channel: str) -> list[dict[str, Any]]:
        """Messages received on one channel, in order."""
        return [payload for name, payload in list(self.messages) if name == channel]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


def start_proc(stack: Any, kind: str, label: str, **kw: Any) -> Proc:
    """Start a worker, listener or beat with a log of its own; a worker is waited for."""
    name = f"engine-{label}"
    log = stack_mod.LOGS / f"{name}.log"
    offset = log.stat().st_size if log.exists() else 0
    starters: dict[str, Callable[..., Proc]] = {
        "worker": stack_mod.start_worker,
        "listener": stack_mod.start_listener,
        "beat": stack_mod.start_beat,
    }
    proc = starters[kind](stack.env, name=name, **kw)
    proc.offset = offset  # type: ignore[attr-defined]
    stack.procs[name] = proc
    if kind == "worker":

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{name} exited:\n{new_log(proc)[-3000:]}")
            return " ready." in new_log(proc)

        wait_until(ready, timeout=60, what=f"{name} to be ready", every=0.1)
    return proc


def new_log(proc: Proc) -> str:
    """What the process logged since it was started (log files are appended to)."""
    return proc.log_text()[getattr(proc, "offset", 0) :]


def tasks_done(proc: Proc, task: str) -> int:
    """How many runs of provisioning.<task> the worker finished since it started."""
    return len(re.findall(rf"Task provisioning\.{task}\[[^\]]+\] succeeded", new_log(proc)))


def make_base_volume(size_mib: int = 64) -> str:
    """A base volume in the test pool for import templates."""
    name = f"engine-base-{uuidlib.uuid4().hex[:8]}.qcow2"
    storage.create_volume(hv(), TEST_POOL, name, size_mib * MiB, "qcow2")
    return name


def import_template(
    host: Host, *, lifecycle: str, base_volume: str, name: str = "Import"
) -> GuestTemplate:
    """A template that clones base_volume, persistent-only or transient-only."""
    return factories.make_template(
        name=name,
        method=GuestTemplate.Method.IMPORT,
        lifecycle=lifecycle,
        base_volume=base_volume,
        pool=host.pools.get(name=TEST_POOL),
    )


@pytest.fixture
def tidy_libvirt(test_host: Host) -> None:
    """Gives the host room for many guests (test_host removes their domains and disks after)."""
    # The test driver's own "test" domain (8 GiB) counts against the host once a reconcile
    # lists it as unmanaged (other guests too): room that placement never runs out of.
    Host.objects.filter(pk=test_host.pk).update(**factories.ROOMY)


def stays(predicate: Callable[[], object], *, seconds: float, what: str) -> None:
    """Watch that predicate holds for a whole window (for things that must NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} no longer holds"
        time.sleep(0.05)


def poll(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    """wait_until with a fine interval, for timings."""
    wait_until(predicate, timeout=timeout, what=what, every=0.01)
