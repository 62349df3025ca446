"""Crashes and restarts: every fault ends in a running guest or a clean failure, never a mess.

Real worker, beat and listener processes, the test's own Redis and libvirt's test driver in this
test process's own libvirtd. A worker child dies at a checkpoint by SIGKILL (VMPORTAL_FAULTS);
Celery acknowledges the lost message, so only the periodic reconcile can bring the request back.
Each test then counts what libvirt holds: one domain and one volume for a guest that runs, none
for a request that failed.

The libvirtd test restarts this test process's own daemon (tests/support/libvirt.py), as a
restart on a real host would, and starts it again however the test ends. The test driver keeps
its domains inside libvirtd, so there a restart loses the installer and the honest outcome is a
clean failure.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import connection, connections
from django.test import Client
from django.urls import reverse

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services import provision
from provisioning.services.provision import CRASH_POINTS, Overrides, request_submit
from tests.factories import ROOMY
from tests.support import stack as processes
from tests.support.libvirt import TEST_POOL, TEST_URI, libvirtd_pid, start_libvirtd, stop_libvirtd
from tests.support.stack import Proc, wait_until
from vmportal import heartbeat

pytestmark = pytest.mark.faults

Status = ProvisioningRequest.Status
ALL_STEPS = ["admitted", "preparing", "installing", "waiting", "defining", "starting", "running"]
RECOVERY_TIMEOUT = 60.0
# Celery's line for a run of the advance task that returned.
_ADVANCE_DONE = re.compile(r"Task provisioning\.advance_request\[[^\]]+\] succeeded")


# --- processes -------------------------------------------------------------------------------


class Rig:
    """The stack's processes under names of their own, each log read from where it started."""

    def __init__(self, stack, marks: Path) -> None:
        self.stack = stack
        self.marks = marks
        self._offsets: dict[str, int] = {}
        # Recover within seconds, not the production minute.
        stack.env.update(VMPORTAL_RECONCILE_EVERY="1", VMPORTAL_STALE_STEP_SECONDS="1")

    def start(
        self, part: str, *, key: str | None = None, faults: str = "", respawn: bool = False
    ) -> Proc:
        """Start worker, beat or listener; with faults, its processes die at those checkpoints."""
        key = key or part
        name = f"faults-{key}"
        env = dict(self.stack.env)
        if faults:
            env.update(VMPORTAL_FAULTS=faults, VMPORTAL_FAULTS_DIR=str(self.marks))
        log_path = processes.LOGS / f"{name}.log"
        self._offsets[key] = log_path.stat().st_size if log_path.exists() else 0
        if part == "worker":
            proc = processes.start_worker(env, name=name, respawn=respawn)
        elif part == "beat":
            proc = processes.start_beat(env, name=name)
        elif part == "listener":
            proc = processes.start_listener(env, name=name)
        else:
            raise ValueError(part)
        self.stack.procs[key] = proc
        return proc

    def log(self, key: str) -> str:
        """What the process started under key wrote so far."""
        proc = self.stack.procs[key]
        with proc.log_path.open("rb") as f:
            f.seek(self._offsets[key])
            return f.read().decode(errors="replace")

    def fired(self, checkpoint: str) -> bool:
        """Whether a process died at checkpoint (faults.py leaves this mark first)."""
        return (self.marks / f"fired-{checkpoint.replace(':', '_')}").exists()

    def kill(self, key: str) -> None:
        """SIGKILL the process and every child of it, and wait until it is gone."""
        proc = self.stack.procs[key]
        proc.signal_group(signal.SIGKILL)
        proc.popen.wait(10)


@pytest.fixture
def rig(stack, tmp_path: Path) -> Rig:
    return Rig(stack, tmp_path)


@pytest.fixture
def hv(test_host: Host) -> Iterator[Hypervisor]:
    """The test driver, with the volumes this test made removed afterwards."""
    # Reconcile counts the test driver's own 8 GiB "test" domain (and other tests' domains) as
    # unmanaged load on the host: give it room enough that placement never says no.
    Host.objects.filter(pk=test_host.pk).update(**ROOMY)
    hv = get_hypervisor(TEST_URI)
    before = {v.name for v in storage.list_volumes(hv, TEST_POOL)}
    yield hv
    with contextlib.suppress(Exception):  # a libvirtd restart already threw them away
        for volume in storage.list_volumes(hv, TEST_POOL):
            if volume.name not in before:
                storage.delete_volume(hv, TEST_POOL, volume.name)


def listener_connected(since: float) -> bool:
    """Whether a listener reported a live libvirt connection after `since` (epoch seconds)."""
    return any(
        beat.get("connected") and beat["at"] > since
        for beat in heartbeat.alive("listener").values()
    )


# --- requests --------------------------------------------------------------------------------


def submit(owner: User, template: GuestTemplate, name: str) -> ProvisioningRequest:
    return request_submit(owner=owner, template=template, overrides=Overrides(name=name))


def guest_of(request: ProvisioningRequest) -> Guest:
    assert request.guest is not None
    return request.guest


def uuid_of(request: ProvisioningRequest) -> str:
    return str(guest_of(request).uuid)


def status_of(request: ProvisioningRequest) -> str:
    request.refresh_from_db()
    return request.status


def wait_status(request: ProvisioningRequest, status: str, timeout: float = 30.0) -> None:
    try:
        wait_until(lambda: status_of(request) == status, timeout=timeout, what=status)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; request {request.name} is {status_of(request)}") from None


def finish_install(hv: Hypervisor, request: ProvisioningRequest, timeout: float) -> None:
    """Wait for the installer, play its power-off on the test driver, wait for the guest."""
    wait_status(request, Status.WAITING, timeout)
    uuid = uuid_of(request)
    operations.shutdown(hv, uuid)
    try:
        wait_status(request, Status.RUNNING, timeout)
    except AssertionError as exc:
        names = sorted(d.name for d in operations.list_domains(hv))
        info = operations.get_info(hv, uuid)
        raise AssertionError(f"{exc}; libvirt has {info}; domains {names}") from None


def footprint(hv: Hypervisor, request: ProvisioningRequest) -> tuple[int, int, int]:
    """Domains with the request's UUID, domains with its name, volumes for its disk."""
    guest = guest_of(request)
    domains = operations.list_domains(hv)
    by_uuid = sum(d.uuid == str(guest.uuid) for d in domains)
    by_name = sum(d.name == guest.name for d in domains)
    volumes = sum(v.name.startswith(f"{guest.name}-") for v in storage.list_volumes(hv, TEST_POOL))
    return by_uuid, by_name, volumes


def job_of(request: ProvisioningRequest) -> Job:
    return Job.objects.get(request=request, kind=Job.Kind.PROVISION)


def assert_runs_once(hv: Hypervisor, request: ProvisioningRequest) -> None:
    """The request ran to the end exactly once: one guest, one disk, every step recorded once."""
    assert status_of(request) == Status.RUNNING
    assert footprint(hv, request) == (1, 1, 1)
    info = operations.get_info(hv, uuid_of(request))
    assert info.state == GuestState.RUNNING and info.persistent
    booted_with = operations.get_xml(hv, info.uuid)
    assert "<kernel>" not in booted_with  # the final config, not the installer's
    assert job_of(request).status == Job.Status.SUCCEEDED
    assert [e.to_status for e in request.events.order_by("id")] == ALL_STEPS


def assert_failed_cleanly(hv: Hypervisor, request: ProvisioningRequest, why: str) -> None:
    """The request failed for `why`, and nothing it made is left in libvirt."""
    assert status_of(request) == Status.FAILED
    assert why in request.error
    guest = guest_of(request)

    def cleaned_up() -> bool:
        # The failure commits first; the clean-up (domain, disks, then the guest's row) follows.
        guest.refresh_from_db(fields=["state"])
        return footprint(hv, request) == (0, 0, 0) and guest.state == Guest.State.UNDEFINED

    try:
        wait_until(cleaned_up, timeout=30, what="the clean-up")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left {footprint(hv, request)}, guest {guest.state}") from None
    job = job_of(request)
    assert job.status == Job.Status.FAILED and job.completed is not None


# --- kill -9 the worker ----------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", CRASH_POINTS)
def test_a_worker_killed_at_a_checkpoint_is_recovered_by_reconcile(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate, checkpoint: str
) -> None:
    rig.start("worker", faults=checkpoint)
    rig.start("beat")
    request = submit(make_user("kim"), kernel_template, "crash1")
    finish_install(hv, request, RECOVERY_TIMEOUT)
    assert rig.fired(checkpoint)
    assert_runs_once(hv, request)
    # Celery's main process notices a lost child on its next pool check (every 5 s).
    wait_until(
        lambda: "exited with 'signal 9 (SIGKILL)'" in rig.log("worker"),
        timeout=15,
        what="the worker to report its lost child",
    )


def test_a_paused_installer_left_by_a_crash_is_resumed(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    rig.start("worker", faults="installing:created")
    request = submit(make_user("kim"), kernel_template, "paused1")
    wait_until(lambda: rig.fired("installing:created"), timeout=30, what="the crash")
    uuid = uuid_of(request)
    # On QEMU the installer is created paused and resumed once its final config is defined; the
    # test driver cannot create paused, so pause it here as the crash would have left it.
    assert operations.suspend(hv, uuid).state == GuestState.PAUSED
    assert status_of(request) == Status.INSTALLING
    rig.start("beat")
    wait_status(request, Status.WAITING, RECOVERY_TIMEOUT)
    info = operations.get_info(hv, uuid)
    assert info.state == GuestState.RUNNING and info.persistent
    finish_install(hv, request, RECOVERY_TIMEOUT)
    assert_runs_once(hv, request)


def test_a_guest_removed_while_its_worker_was_down_fails_the_request_cleanly(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    # The listener, not beat, ends the install, so nothing retries the step until beat starts.
    rig.start("worker", faults="starting:begin")
    rig.start("listener")
    wait_until(lambda: listener_connected(0), timeout=30, what="the listener to connect")
    request = submit(make_user("kim"), kernel_template, "gone1")
    wait_status(request, Status.WAITING)
    # The run that installed looks at the installer once more after moving to "waiting". An
    # installer that stops before that look lets the run and the listener's new run both go on
    # (harmless in production); here the second would pass the checkpoint the first died at.
    wait_until(
        lambda: re.search(r"advance_request\[[^\]]+\] succeeded", rig.log("worker")),
        timeout=30,
        what="the installing run to return",
    )
    uuid = uuid_of(request)
    operations.shutdown(hv, uuid)
    wait_until(lambda: rig.fired("starting:begin"), timeout=30, what="the crash")
    assert status_of(request) == Status.STARTING
    operations.undefine(hv, uuid)  # someone removes the guest behind the portal's back
    rig.start("beat")
    wait_status(request, Status.FAILED, RECOVERY_TIMEOUT)
    assert_failed_cleanly(hv, request, "vanished from libvirt")


def test_a_clean_up_cut_short_after_the_domain_went_is_finished_by_reconcile(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    rig.start("worker", faults="cleanup:undefined")
    request = submit(make_user("kim"), kernel_template, "cut1")
    wait_status(request, Status.WAITING)
    provision.cancel(request.pk)
    wait_until(lambda: rig.fired("cleanup:undefined"), timeout=30, what="the crash")
    # The worker died with the domain gone and the disk still there: nothing in libvirt points
    # at the disk any more, so only the request can say it is left over.
    assert footprint(hv, request) == (0, 0, 1)
    request.refresh_from_db()
    assert request.status == Status.CANCELLED and request.cleanup_pending
    rig.start("beat")
    wait_until(
        lambda: footprint(hv, request) == (0, 0, 0), timeout=RECOVERY_TIMEOUT, what="the disk to go"
    )
    wait_until(
        lambda: job_of(request).status == Job.Status.CANCELLED, timeout=10, what="the job to end"
    )
    request.refresh_from_db()
    assert not request.cleanup_pending
    assert "was not cleaned up; cleaning up now" in rig.log("worker")


@contextlib.contextmanager
def request_row_locked(request: ProvisioningRequest) -> Iterator[None]:
    """Hold a lock (from a second connection) that stops other processes moving the request."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            if connection.vendor == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # SQLite locks every writer out
            else:
                cursor.execute("BEGIN")
                table = ProvisioningRequest._meta.db_table
                cursor.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", [request.pk])
            try:
                yield
            finally:
                cursor.execute("ROLLBACK")
    finally:
        other.close()


def test_a_whole_worker_killed_mid_install_is_replaced_and_the_request_completes(
    rig: Rig, hv: Hypervisor, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    # Known before the lock: the first install step would otherwise write the probed type.
    Host.objects.filter(pk=test_host.pk).update(detected_domain_type="qemu")
    rig.start("worker", faults="installing:begin")
    request = submit(make_user("kim"), kernel_template, "whole1")
    wait_until(lambda: rig.fired("installing:begin"), timeout=30, what="the first crash")
    wait_status(request, Status.INSTALLING)
    uuid = uuid_of(request)
    with request_row_locked(request):
        # A fresh child takes the step again, makes the installer and its final config, then
        # blocks on the locked row: the task is in flight when the whole worker dies.
        provision.enqueue_advance(request)
        wait_until(
            lambda: operations.get_info(hv, uuid).persistent,
            timeout=30,
            what="the installer and its final config",
        )
        assert rig.stack.procs["worker"].alive()
        rig.kill("worker")
    assert status_of(request) == Status.INSTALLING
    rig.start("worker", key="worker-2")
    rig.start("beat")
    finish_install(hv, request, RECOVERY_TIMEOUT)
    assert_runs_once(hv, request)


# --- restart libvirtd ------------------------------------------------------------------------


def libvirtd_answers() -> bool:
    hv = get_hypervisor(TEST_URI)
    hv.mark_broken()  # probe, and reconnect if the daemon behind the connection went away
    return bool(hv.version())


def restart_libvirtd() -> None:
    """Stop this process's libvirtd, start it again, and wait until it answers."""
    before = libvirtd_pid()
    assert before is not None, "this test process's libvirtd is not running"
    stop_libvirtd()
    assert libvirtd_pid() is None, "libvirtd did not stop"
    ensure_libvirtd()
    assert libvirtd_pid() not in (None, before), "libvirtd was not started afresh"


def ensure_libvirtd() -> None:
    """Start this process's libvirtd unless it runs; wait until this process's client answers."""
    start_libvirtd()
    wait_until(libvirtd_answers, timeout=30, what="libvirtd to answer", every=0.2)


def test_a_libvirtd_restart_while_waiting_fails_the_request_cleanly_and_the_listener_recovers(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    # No beat: only the listener (its reconcile on reconnect, then its events) moves requests.
    rig.start("worker")
    rig.start("listener")
    wait_until(lambda: listener_connected(0), timeout=30, what="the listener to connect")
    owner = make_user("kim")
    request = submit(owner, kernel_template, "lvd1")
    wait_status(request, Status.WAITING)
    try:
        restart_libvirtd()
        # The test driver keeps its domains inside libvirtd, so the restart threw the installer
        # away: on this driver the honest end is a clean failure, never a stuck request.
        wait_status(request, Status.FAILED, RECOVERY_TIMEOUT)
    finally:
        ensure_libvirtd()  # whatever happened, leave this process's libvirtd running
    assert_failed_cleanly(hv, request, "vanished")
    assert re.search("lost its connection|stopped answering", rig.log("listener"))
    # Events on the new connection are applied: a second request finishes by its event alone.
    later = submit(owner, kernel_template, "lvd2")
    finish_install(hv, later, RECOVERY_TIMEOUT)
    assert_runs_once(hv, later)
    since = time.time()
    wait_until(lambda: listener_connected(since), timeout=10, what="a connected heartbeat")


# --- restart Redis ---------------------------------------------------------------------------


def test_a_request_made_while_redis_is_down_is_recorded_and_completes_later(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate, caplog
) -> None:
    rig.start("worker", respawn=True)  # as the Procfile runs it (see the Redis-restart test)
    rig.start("beat")
    owner = make_user("kim")
    client = Client()
    client.force_login(owner)
    rig.stack.redis.stop()
    t = kernel_template
    response = client.post(
        reverse("new-guest"),
        {
            "template": t.pk,
            "name": "rds1",
            "vcpus": t.vcpus_default,
            "memory_mib": t.memory_mib_default,
            "disk_mib": t.disk_mib_default,
        },
    )
    request = ProvisioningRequest.objects.get(name="rds1")
    assert response.status_code == 302
    assert response["Location"] == reverse("request-detail", args=[request.pk])
    assert request.status == Status.PENDING
    assert "could not queue provisioning.advance_request" in caplog.text
    rig.stack.redis.start()
    finish_install(hv, request, RECOVERY_TIMEOUT)
    assert "stalled in pending" in rig.log("worker")
    assert_runs_once(hv, request)


def test_a_redis_restart_while_waiting_loses_no_request(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    # Respawned as the Procfile does: kombu can kill a worker that loses Redis while a message is
    # unacknowledged ("Unrecoverable error ... 'NoneType' object has no attribute 'hostname'").
    rig.start("worker", respawn=True)
    rig.start("listener")
    rig.start("beat")
    request = submit(make_user("kim"), kernel_template, "rdw1")
    wait_status(request, Status.WAITING)
    rig.stack.redis.stop()
    rig.stack.redis.start()  # empty: whatever was queued is gone
    operations.shutdown(hv, uuid_of(request))
    wait_status(request, Status.RUNNING, RECOVERY_TIMEOUT)
    assert_runs_once(hv, request)


def test_redis_down_when_the_installer_finishes_delays_the_request_but_loses_nothing(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    rig.start("worker", respawn=True)  # as the Procfile runs it (see the Redis-restart test)
    rig.start("listener")
    rig.start("beat")
    request = submit(make_user("kim"), kernel_template, "rdl1")
    wait_status(request, Status.WAITING)
    # The step that started the installer looks at it once more after recording the wait, and
    # goes on itself if it already stopped: shut it down only once that run is over, or the
    # worker rightly finishes the request with the broker away (seen in CI).
    wait_until(
        lambda: _ADVANCE_DONE.search(rig.log("worker")),
        timeout=30,
        what="the worker's install step to return",
    )
    rig.stack.redis.stop()
    operations.shutdown(hv, uuid_of(request))
    # The listener records the installer's end in the database; only queueing the next step fails.
    wait_status(request, Status.DEFINING)
    wait_until(
        lambda: "could not queue provisioning.advance_request" in rig.log("listener"),
        timeout=30,
        what="the listener to log the failed enqueue",
    )
    assert status_of(request) == Status.DEFINING  # no worker can run it without the broker
    rig.stack.redis.start()
    wait_status(request, Status.RUNNING, RECOVERY_TIMEOUT)
    assert "stalled in defining" in rig.log("worker")
    assert_runs_once(hv, request)


# --- kill -9 the listener --------------------------------------------------------------------


def test_a_new_listener_catches_up_on_an_installer_that_finished_while_none_ran(
    rig: Rig, hv: Hypervisor, make_user, kernel_template: GuestTemplate
) -> None:
    # No beat: only a listener can notice that the installer finished.
    rig.start("worker")
    rig.start("listener")
    request = submit(make_user("kim"), kernel_template, "lsn1")
    wait_status(request, Status.WAITING)
    rig.kill("listener")
    operations.shutdown(hv, uuid_of(request))
    assert not operations.get_info(hv, uuid_of(request)).active
    assert status_of(request) == Status.WAITING  # nobody has seen it
    rig.start("listener", key="listener-2")
    wait_status(request, Status.RUNNING, RECOVERY_TIMEOUT)
    assert_runs_once(hv, request)
