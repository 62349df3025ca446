"""The steps from an admitted request to a running guest, one idempotent step at a time.

Every step first reads what libvirt really has (the guest's UUID is fixed when the request is
made), does only what is missing, then moves the request on with a compare-and-swap that also
writes the history, the job's log and the news for live pages in one commit. Running a step
twice, or two workers running it at once, is harmless: libvirt refuses a second domain with the
same UUID or name, and only one move wins. Waiting for the installer holds no worker slot: the
event listener (or the periodic reconcile) calls `request_domain_stopped`.

What a step needs is loaded once per `advance`; between steps only the request's own status
changes, and the step that moved it knows the new one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from provisioning import faults, queue
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.errors import (
    AlreadyExists,
    InvalidConfig,
    NotFound,
    Unsupported,
    WrongState,
)
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import GuestTemplate, ProvisioningRequest
from provisioning.services import addresses, audit, quotas, snapshots, transitions
from provisioning.services.guests import guest_sync_state
from provisioning.services.provision.ending import cleanup, fail, request_domain_stopped
from provisioning.services.provision.spec import Plan, StepFailed, load_request, plan_of

log = logging.getLogger(__name__)
Status = ProvisioningRequest.Status
MiB = 1024 * 1024
REBUILD_SHUTDOWN_GRACE = timedelta(seconds=60)

# Progress of the provisioning job at each status.
PROGRESS = {
    Status.PENDING: 0,
    Status.ADMITTED: 10,
    Status.PREPARING: 20,
    Status.INSTALLING: 35,
    Status.WAITING: 50,
    Status.DEFINING: 85,
    Status.STARTING: 95,
    Status.RUNNING: 100,
}

# Where a worker may die (the crash tests kill it at each, by faults.checkpoint): the start of
# every step, and each point between a step's libvirt calls and its move.
CRASH_POINTS = (
    "pending:begin",
    "admitted:begin",
    "preparing:begin",
    "preparing:done",
    "installing:begin",
    "installing:created",
    "installing:defined",
    "defining:begin",
    "defining:done",
    "starting:begin",
    "starting:done",
)


def _crash_point(name: str) -> None:
    assert name in CRASH_POINTS, name
    faults.checkpoint(name)


def _still_in(run: Run, status: Status) -> None:
    """Raise StaleState unless the request is still in `status` (read from the database).

    Called right before what must not happen twice once the request moved on: creating the
    installer, a rebuild's removing the disks, starting the guest. A duplicate run of a step (a
    redelivered message) that loaded the request before another run moved it on, and reaches
    libvirt after the installer already finished, would otherwise install again (seen: a
    request left waiting for an installer nobody would stop).
    """
    actual = (
        ProvisioningRequest.objects.filter(pk=run.request.pk).values_list("status", flat=True).get()
    )
    if actual != status:
        raise transitions.StaleState(
            f"request #{run.request.pk}", actual=actual, expected=[status], to=status
        )


class Later(Exception):
    """The step must wait (a guest shutting down); it is queued again after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"again in {seconds} s")


@dataclass
class Run:
    """One `advance`: the plan, the request's job, and log lines waiting for the next move."""

    plan: Plan
    job: transitions.JobRef | None
    notes: list[str] = field(default_factory=list)

    @property
    def request(self) -> ProvisioningRequest:
        return self.plan.request

    def move(self, expected: Status, to: Status, note: str = "", **fields: Any) -> None:
        """Move the request on, with its history, job log and news in one commit."""
        transitions.request_step(
            self.request.pk,
            expected=expected,
            to=to,
            note=note,
            job=self.job,
            lines=[*self.notes, note or Status(to).label],
            progress=PROGRESS.get(to),
            finish=to == Status.RUNNING,
            **fields,
        )
        self.notes.clear()
        self.request.status = to
        for name, value in fields.items():
            setattr(self.request, name, value)

    def note_now(self, line: str) -> None:
        """A log line that cannot wait for the next move (the step is about to wait)."""
        if self.job is not None:
            transitions.job_note(self.job, [*self.notes, line])
        self.notes.clear()


def _admit(run: Run) -> None:
    if run.plan.rebuild:
        # The guest exists and counts against the quota already.
        run.move(Status.PENDING, Status.ADMITTED, "Admitted: rebuild of an existing guest")
        return
    with transaction.atomic():
        quotas.quota_lock(run.request.owner)
        problem = quotas.quota_problem(run.request)
        if not problem:
            run.move(Status.PENDING, Status.ADMITTED, "Admitted within quota")
    if problem:
        audit.refused("request.admit", run.request, problem, by=run.request.owner)
        raise StepFailed(problem)


def _stop_for_rebuild(run: Run) -> None:
    """Shut the guest down gracefully, forcing it off once the grace period is over."""
    plan = run.plan
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active:
        return
    now = timezone.now()
    if run.request.deadline is None:
        # A paused guest ignores ACPI; the grace period then ends in a forced off.
        with contextlib.suppress(WrongState):
            operations.shutdown(plan.hv, plan.uuid)
        ProvisioningRequest.objects.filter(pk=run.request.pk, status=Status.PREPARING).update(
            deadline=now + REBUILD_SHUTDOWN_GRACE
        )
        run.note_now("Asked the guest to shut down before the rebuild")
        raise Later(2.0)
    if run.request.deadline > now:
        raise Later(2.0)
    operations.destroy(plan.hv, plan.uuid)
    run.notes.append("The guest did not shut down in time; forced off")


def _create_volume(plan: Plan, name: str, mib: int) -> bool:
    """Make an empty volume; False if it exists (an earlier run made it, or a rebuild keeps it)."""
    try:
        storage.create_volume(plan.hv, plan.pool.name, name, mib * MiB, "qcow2")
    except AlreadyExists:
        return False
    except NotFound as exc:
        raise StepFailed(f"storage pool {plan.pool.name} is missing on {plan.host}") from exc
    return True


def _prepare(run: Run) -> None:
    plan = run.plan
    data = plan.data_volume
    keep_data = plan.rebuild and plan.request.keep_data_disk
    if plan.rebuild:
        _still_in(run, Status.PREPARING)
        _stop_for_rebuild(run)
        operations.remove_managed_save(plan.hv, plan.uuid)
        # Internal snapshots live in the disks made anew below: they go with them.
        snapshots.drop_all(plan.hv, plan.guest)
        # The system disk is made anew from the template, as on the first install; the data
        # disk too unless the rebuild keeps it. Deleting and making an empty disk again is
        # harmless when a crashed run of this step repeats it.
        storage.delete_volume(plan.hv, plan.pool.name, plan.volume)
        if data and not keep_data:
            storage.delete_volume(plan.hv, plan.pool.name, data)
    if plan.template.method == GuestTemplate.Method.IMPORT:
        try:
            # qcow2 whatever the base's format (a raw disk image converts): the guest's
            # config says qcow2.
            storage.clone_volume(
                plan.hv, plan.pool.name, plan.template.base_volume, plan.volume, fmt="qcow2"
            )
        except AlreadyExists:
            pass
        except NotFound as exc:
            raise StepFailed(f"base volume {plan.template.base_volume} is missing: {exc}") from exc
    elif plan.cloud:
        base = plan.template.base_volume
        try:
            storage.create_overlay(
                plan.hv, plan.pool.name, base, plan.volume, plan.guest.disk_mib * MiB
            )
        except AlreadyExists:
            pass
        except NotFound as exc:
            raise StepFailed(f"base image {base} is missing: {exc}") from exc
    else:
        _create_volume(plan, plan.volume, plan.guest.disk_mib)
    note = f"Disk {plan.volume} ready ({plan.guest.disk_mib} MiB)"
    if data:
        made = _create_volume(plan, data, plan.guest.data_disk_mib)
        what = "kept" if keep_data else "ready"
        if keep_data and made:  # removed behind the portal's back: an empty one will do
            what = "was missing, made anew"
        note += f"; data disk {data} {what} ({plan.guest.data_disk_mib} MiB)"
    if plan.cloud:
        note += "; " + _write_seed(plan)
    if plan.answer_volume:
        note += "; " + _write_answer_disk(plan)
    _crash_point("preparing:done")
    if plan.installs:
        after = Status.INSTALLING
    elif plan.transient:
        after = Status.STARTING  # createXML: nothing is ever defined
    else:
        after = Status.DEFINING
    run.move(Status.PREPARING, after, note)


def _upload_anew(plan: Plan, volume: str, data: bytes) -> bool:
    """Make `volume` anew holding `data` (a crashed upload may have left half of one); False
    when the host takes no uploads (libvirt's test driver, whose guests never read a disk) and
    an empty volume of the size stands in."""
    storage.delete_volume(plan.hv, plan.pool.name, volume)
    try:
        storage.upload_bytes(plan.hv, plan.pool.name, volume, data)
    except Unsupported:
        storage.create_volume(plan.hv, plan.pool.name, volume, len(data), "raw")
        return False
    return True


def _write_seed(plan: Plan) -> str:
    """Make the cloud-init seed anew (a crashed upload may have left half of one); a log line."""
    assert plan.seed_volume is not None
    if not _upload_anew(plan, plan.seed_volume, plan.seed()):
        return (
            f"cloud-init seed {plan.seed_volume} made empty, as this host takes no uploads "
            f"(instance {plan.instance_id})"
        )
    return f"cloud-init seed {plan.seed_volume} ready (instance {plan.instance_id})"


def _write_answer_disk(plan: Plan) -> str:
    """Make the OEMDRV CD-ROM with the request's answer file anew; a log line."""
    assert plan.answer_volume is not None
    if not _upload_anew(plan, plan.answer_volume, plan.answer_iso()):
        return f"answer file CD-ROM {plan.answer_volume} made empty, as this host takes no uploads"
    return f"answer file on the OEMDRV CD-ROM {plan.answer_volume} for the install"


def _define_final(plan: Plan, spec: domxml.GuestSpec) -> None:
    """Define the final (persistent) config, schema-checked once per template version."""
    validate = plan.validate("final")
    operations.define(plan.hv, domxml.final_xml(spec), validate=validate)
    if validate:
        plan.validated("final")


def _create(plan: Plan, xml: str, phase: str, **flags: bool) -> DomainInfo:
    """createXML, schema-checked once per template version and phase."""
    validate = plan.validate(phase)
    info = operations.create_transient(plan.hv, xml, validate=validate, **flags)
    if validate:
        plan.validated(phase)
    return info


def _install(run: Run) -> None:
    plan = run.plan
    spec = plan.spec()
    info = operations.get_info(plan.hv, plan.uuid)
    if info.active:
        _define_final(plan, spec)
        if info.state == GuestState.PAUSED:
            # An earlier run died between creating the installer paused and resuming it.
            with contextlib.suppress(WrongState):  # a duplicate run resumed it first
                operations.resume(plan.hv, plan.uuid)
    else:
        _still_in(run, Status.INSTALLING)
        # Since this run read libvirt, a duplicate run may have created the installer, which
        # powered off already: booting it again would install a second time while the request
        # waited for it (the two-workers test, once). The move says whether that run moved on.
        if not _installer_ran(plan):
            _create_installer(plan, spec)
    _crash_point("installing:defined")
    deadline = timezone.now() + timedelta(minutes=plan.template.install_timeout_minutes)
    run.move(Status.INSTALLING, Status.WAITING, "Installer running", deadline=deadline)
    # The installer may have finished before we started listening. This run goes on with the
    # next step itself: a second runner queued here would only race it.
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active and request_domain_stopped(run.request.pk, queue_next=False, info=info):
        run.request.status = Status.DEFINING


def _create_installer(plan: Plan, spec: domxml.GuestSpec) -> None:
    """Boot the installer and define the final config at once (unless a duplicate run did)."""
    # Also for a rebuild: createXML starts the inactive persistent guest (same name and UUID)
    # with the installer's config, leaving its persistent config for the next boot.
    install_xml = domxml.install_xml(spec)
    try:
        try:
            # Paused until the final config is in place, so nothing runs half-registered.
            _create(plan, install_xml, "install", paused=True)
            paused = True
        except Unsupported:
            _create(plan, install_xml, "install")
            paused = False
    except (AlreadyExists, WrongState):
        # A duplicate run of this step got there first (libvirt says "already active" when the
        # guest with this UUID runs): make sure of the final config, as that run does.
        if not operations.get_info(plan.hv, plan.uuid).active:
            raise StepFailed(f"a different guest named {plan.guest.name} exists") from None
        _define_final(plan, spec)
    else:
        _crash_point("installing:created")
        # virt-install's way: the persistent final config exists from the first second, so a
        # crash from here on leaves a guest that only needs starting, never an orphan.
        _define_final(plan, spec)
        if paused:
            operations.resume(plan.hv, plan.uuid)


def _installer_ran(plan: Plan) -> bool:
    """Whether an installer of this request has run: the guest's persistent config is this
    request's final config, which a run defines right after creating the installer."""
    try:
        xml = operations.get_xml(plan.hv, plan.uuid, inactive=True)
    except NotFound:
        return False
    return domxml.read_metadata(xml).get("request") == str(plan.request.pk)


def _define(run: Run) -> None:
    plan = run.plan
    if not plan.transient:
        _define_final(plan, plan.spec())
    if plan.answer_volume:
        # The installer is done with it: the installed guest has no such CD-ROM.
        storage.delete_volume(plan.hv, plan.pool.name, plan.answer_volume)
    _crash_point("defining:done")
    run.move(Status.DEFINING, Status.STARTING, "Final configuration defined")


def _boot(run: Run, boot: Callable[[bool], DomainInfo]) -> DomainInfo:
    """Boot the guest, paused if the request asks; pause it at once where a driver cannot."""
    if not run.request.start_paused:
        return boot(False)
    try:
        return boot(True)
    except Unsupported:
        # The test driver has no START_PAUSED: the guest runs for a moment, then pauses.
        boot(False)
        return operations.suspend(run.plan.hv, run.plan.uuid)


def _start(run: Run) -> None:
    plan, r = run.plan, run.request
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active:
        _still_in(run, Status.STARTING)
    try:
        if plan.transient and not info.exists:
            xml = domxml.final_xml(plan.spec())
            info = _boot(
                run,
                lambda paused: _create(
                    plan, xml, "final", paused=paused, autodestroy=r.autodestroy
                ),
            )
        elif not info.active:
            info = _boot(run, lambda paused: operations.start(plan.hv, plan.uuid, paused=paused))
    except (AlreadyExists, WrongState):
        # A duplicate run of this step started it first.
        info = operations.get_info(plan.hv, plan.uuid)
        if not info.active:
            raise
    if r.autostart and not plan.transient and not info.autostart:
        info = operations.set_autostart(plan.hv, plan.uuid, True)
    _crash_point("starting:done")
    # The guest's state, the request's end and its job's end in one commit: a worker lost
    # between them would leave the job running forever, as reconcile passes over final requests.
    with transaction.atomic():
        guest_sync_state(host=plan.host, info=info, guest=plan.guest)
        run.move(Status.STARTING, Status.RUNNING, _started(plan.transient, info, r.autodestroy))
    if info.active and plan.nics:  # with no NIC there is no address to look for
        addresses.watch_after_start(plan.guest, plan.host)


def _started(transient: bool, info: DomainInfo, autodestroy: bool) -> str:
    """What the request's last line says: how the guest runs, in libvirt's terms."""
    if not transient:
        return f"Guest {info.state.value}"
    how = "Started paused" if info.state == GuestState.PAUSED else "Started"
    if not info.active:
        how = f"Guest {info.state.value}"
    return f"{how} (transient{', autodestroy' if autodestroy else ''})"


def _pass_through(run: Run) -> None:
    run.move(Status.ADMITTED, Status.PREPARING)


STEPS: dict[str, Callable[[Run], None]] = {
    Status.PENDING: _admit,
    Status.ADMITTED: _pass_through,
    Status.PREPARING: _prepare,
    Status.INSTALLING: _install,
    Status.DEFINING: _define,
    Status.STARTING: _start,
}


def _load(request_id: int) -> Run | None:
    """The request with everything its steps read, and its job; None once it needs no step."""
    request = load_request(request_id)
    if request.status not in STEPS:
        return None
    job = transitions.request_job_ref(request)
    return Run(plan_of(request), job)


def advance(request_id: int) -> None:
    """Run the request's steps until it waits for the installer or is final."""
    try:
        run = _load(request_id)
    except StepFailed as exc:
        fail(request_id, str(exc))
        return
    if run is None:
        return  # waiting (the listener moves it on) or final
    while True:
        status = run.request.status
        step = STEPS.get(status)
        if step is None:
            return  # waiting (the listener moves it on) or final
        _crash_point(f"{status}:begin")
        try:
            step(run)
        except transitions.StaleState as exc:
            # Someone else moved it: another worker ran this step, or the user cancelled.
            log.info("request #%s moved on elsewhere: %s", request_id, exc)
            if exc.actual in (Status.CANCELLED, Status.FAILED):
                cleanup(request_id)
                return
            run.request.refresh_from_db(fields=["status", "deadline", "error", "updated"])
        except Later as later:
            assert run.request.host is not None
            queue.send(
                queue.ADVANCE_REQUEST,
                request_id,
                queue=run.request.host.queue,
                countdown=later.seconds,
            )
            return
        except (StepFailed, InvalidConfig, domxml.SpecError) as exc:
            fail(request_id, str(exc))
            return
        except NotFound as exc:
            # Something the step needs was removed from libvirt behind the portal's back; the
            # step would fail the same way on every retry, so fail now and clean up.
            fail(request_id, f"it vanished from libvirt: {exc}")
            return
