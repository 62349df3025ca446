"""Provisioning: from a user's request to a running guest, one idempotent step at a time.

Every step first reads what libvirt really has (the guest's UUID is fixed when the request is
made), does only what is missing, then moves the request on with a compare-and-swap. Running a
step twice, or two workers running it at once, is harmless: libvirt refuses a second domain with
the same UUID or name, and only one move wins. Waiting for the installer holds no worker slot:
the event listener (or the periodic reconcile) calls `request_domain_stopped`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from provisioning import faults
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.errors import (
    AlreadyExists,
    HypervisorError,
    InvalidConfig,
    NotFound,
    Unsupported,
    WrongState,
)
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import (
    NAME_VALIDATOR,
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    StoragePool,
    TemplateVersion,
)
from provisioning.services import placement, quotas, transitions
from provisioning.services.consoles import console_log_path
from provisioning.services.guests import guest_sync_state
from provisioning.services.hosts import host_domain_type, host_ensure_local

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


class SubmitError(ValueError):
    """A request that cannot be made, with a message per form field."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


class StepFailed(Exception):
    """A step met a permanent failure; the request fails with this message."""


@dataclass(frozen=True)
class Overrides:
    """What the user picked within the template's ranges (None: the template's default)."""

    name: str
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    data_disk_mib: int | None = None
    start_paused: bool | None = None
    autostart: bool | None = None
    autodestroy: bool | None = None


# --- submitting ---------------------------------------------------------------------------


def _check_overrides(template: GuestTemplate, o: Overrides) -> dict[str, Any]:
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    try:
        NAME_VALIDATOR(o.name)
    except Exception:  # noqa: BLE001 - the validator's message is for forms; say it plainly
        errors["name"] = "Use 1-63 letters, digits, dots, dashes or underscores."
    for field, unit in (("vcpus", ""), ("memory_mib", " MiB"), ("disk_mib", " MiB")):
        picked = getattr(o, field)
        low, default, high = (getattr(template, f"{field}_{k}") for k in ("min", "default", "max"))
        value = default if picked is None else picked
        if not low <= value <= high:
            errors[field] = f"Pick between {low}{unit} and {high}{unit}."
        values[field] = value
    most = template.data_disk_mib_max
    picked = template.data_disk_mib_default if o.data_disk_mib is None else o.data_disk_mib
    if picked and not most:
        errors["data_disk_mib"] = "This template offers no data disk."
    elif not 0 <= picked <= most:
        errors["data_disk_mib"] = f"Pick between 0 (none) and {most} MiB."
    values["data_disk_mib"] = picked
    transient = template.lifecycle == GuestTemplate.Lifecycle.TRANSIENT
    for option in ("start_paused", "autostart", "autodestroy"):
        picked = getattr(o, option)
        values[option] = getattr(template, option) if picked is None else bool(picked)
    if values["autostart"] and transient:
        errors["autostart"] = "Transient guests cannot autostart."
    if values["autodestroy"] and not transient:
        errors["autodestroy"] = "Only transient guests can be autodestroyed."
    if errors:
        raise SubmitError(errors)
    return values


def request_place(*, template: GuestTemplate, values: dict[str, Any]) -> Host:
    """The host a new guest goes to (call inside the transaction that records the guest)."""
    if not Host.objects.exists():
        host_ensure_local()  # a fresh install: the local libvirt is the first host
    try:
        return placement.place(
            template=template,
            vcpus=values["vcpus"],
            memory_mib=values["memory_mib"],
            disk_mib=values["disk_mib"] + values["data_disk_mib"],
        )
    except placement.NoRoom as exc:
        raise SubmitError({"template": f"Cannot place the guest: {exc}."}) from exc


def request_submit(
    *, owner: User, template: GuestTemplate, overrides: Overrides
) -> ProvisioningRequest:
    """Record a request (with its guest row and job) and queue its first step after commit."""
    if not template.enabled:
        raise SubmitError({"template": "This template is not offered any more."})
    values = _check_overrides(template, overrides)
    try:
        with transaction.atomic():
            host = request_place(template=template, values=values)
            if (
                Guest.objects.filter(host=host, name=overrides.name)
                .exclude(state=Guest.State.UNDEFINED)
                .exists()
                or ProvisioningRequest.objects.filter(
                    host=host, name=overrides.name, status__in=_ACTIVE_STATUSES
                ).exists()
            ):
                raise SubmitError({"name": f"A guest named {overrides.name} exists already."})
            guest = Guest.objects.create(
                owner=owner,
                host=host,
                template=template,
                template_version=template.version,
                name=overrides.name,
                mac=domxml.random_mac(),
                vcpus=values["vcpus"],
                memory_mib=values["memory_mib"],
                disk_mib=values["disk_mib"],
                data_disk_mib=values["data_disk_mib"],
            )
            request = ProvisioningRequest.objects.create(
                owner=owner,
                template=template,
                template_version=template.version,
                host=host,
                guest=guest,
                name=overrides.name,
                **values,
            )
            job = transitions.job_open(
                kind=Job.Kind.PROVISION, guest=guest, request=request, created_by=owner
            )
            transitions.job_log(job.pk, f"Requested {template} on {host}", progress=0)
            transaction.on_commit(lambda: enqueue_advance(request))
    except IntegrityError as exc:
        raise SubmitError({"name": f"A guest named {overrides.name} exists already."}) from exc
    return request


_ACTIVE_STATUSES = [s for s in Status if s not in transitions.REQUEST_FINAL]


def reprovision_submit(
    *, guest: Guest, by: User | None, latest: bool = True, keep_data_disk: bool = True
) -> ProvisioningRequest:
    """Rebuild a guest from its template (keeping name, UUID and MAC); GuestBusy if it is busy.

    The system disk is always made anew; the data disk (if the guest has one) is kept as it is,
    or made anew and empty when keep_data_disk is false.
    """
    template = guest.template
    if template is None:
        raise SubmitError({"template": f"{guest.name} was not made from a template."})
    if guest.state == Guest.State.UNDEFINED:
        raise SubmitError({"guest": f"{guest.name} does not exist any more."})
    version = (
        template.version if latest or guest.template_version is None else guest.template_version
    )
    if (
        version != template.version
        and not TemplateVersion.objects.filter(template=template, version=version).exists()
    ):
        # Building today's template while recording the old version would mislead everyone.
        raise SubmitError(
            {"template": f"v{version} of {template.name} was not kept; rebuild from the latest."}
        )
    with transaction.atomic():
        job = transitions.job_open(kind=Job.Kind.REPROVISION, guest=guest, created_by=by)
        request = ProvisioningRequest.objects.create(
            kind=ProvisioningRequest.Kind.REBUILD,
            owner=guest.owner,
            template=template,
            template_version=version,
            host=guest.host,
            guest=guest,
            name=guest.name,
            vcpus=guest.vcpus,
            memory_mib=guest.memory_mib,
            disk_mib=guest.disk_mib,
            data_disk_mib=guest.data_disk_mib,
            keep_data_disk=keep_data_disk,
            autostart=guest.autostart,
        )
        Job.objects.filter(pk=job.pk).update(request=request)
        Guest.objects.filter(pk=guest.pk).update(template_version=version)
        data = ""
        if guest.data_disk_mib:
            data = ", keeping the data disk" if keep_data_disk else ", with an empty data disk"
        transitions.job_log(
            job.pk, f"Rebuild from {template.name} v{version} requested{data}", progress=0
        )
        transaction.on_commit(lambda: enqueue_advance(request))
    return request


def enqueue_advance(request: ProvisioningRequest, *, countdown: float | None = None) -> None:
    """Queue the request's next step on its host's queue."""
    from provisioning import tasks

    assert request.host is not None
    options: dict[str, Any] = {"queue": request.host.queue}
    if countdown is not None:
        options["countdown"] = countdown
    send_task(tasks.advance_request, (request.pk,), **options)


def send_task(task: Any, args: tuple[Any, ...], **options: Any) -> bool:
    """Queue a task; with the broker away, log it and leave the row for reconcile to re-queue."""
    try:
        task.apply_async(args, **options)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds when Redis is down
        log.warning("could not queue %s%s (reconcile will): %s", task.name, args, exc)
        return False
    return True


# --- the steps --------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a request needs from libvirt: the XML of both phases, and its disk."""

    request: ProvisioningRequest
    guest: Guest
    host: Host
    template: GuestTemplate
    pool: StoragePool
    volume: str
    domain_type: str | None = None  # None: the host's (probed once)
    job_id: int | None = None  # the request's provisioning job, when the caller looked it up

    @property
    def hv(self) -> Hypervisor:
        return get_hypervisor(self.host.uri)

    @property
    def uuid(self) -> str:
        return str(self.guest.uuid)

    @property
    def installs(self) -> bool:
        t = self.template
        return (
            t.lifecycle == GuestTemplate.Lifecycle.INSTALL
            and t.method != GuestTemplate.Method.IMPORT
        )

    @property
    def data_volume(self) -> str | None:
        """The data disk's volume (beside the system disk, in the same pool), if it has one."""
        if not self.guest.data_disk_mib:
            return None
        return f"{self.guest.name}-{self.guest.uuid.hex[:8]}-data.qcow2"

    @property
    def volumes(self) -> list[str]:
        return [v for v in (self.volume, self.data_volume) if v]

    @property
    def rebuild(self) -> bool:
        return self.request.kind == ProvisioningRequest.Kind.REBUILD

    @property
    def transient(self) -> bool:
        return self.template.lifecycle == GuestTemplate.Lifecycle.TRANSIENT

    def spec(self) -> domxml.GuestSpec:
        t, g = self.template, self.guest
        media = domxml.BootMedia()
        if t.media is not None and t.method == GuestTemplate.Method.KERNEL:
            media = domxml.BootMedia(
                kernel=t.media.kernel_path, initrd=t.media.initrd_path, cmdline=t.kernel_cmdline
            )
        elif t.media is not None and t.method == GuestTemplate.Method.CDROM:
            iso: domxml.VolumeRef | str = (
                domxml.VolumeRef(t.media.pool.name, t.media.volume)
                if t.media.pool is not None
                else t.media.path
            )
            media = domxml.BootMedia(iso=iso)
        nics: tuple[domxml.NicSpec, ...] = ()
        if t.network is not None:
            kind = {"network": "network", "bridge": "bridge"}[t.network.kind]
            nics = (domxml.NicSpec(mac=g.mac, **{kind: t.network.source}),)
        return domxml.GuestSpec(
            name=g.name,
            uuid=self.uuid,
            memory_mib=g.memory_mib,
            vcpus=g.vcpus,
            method=t.method,  # type: ignore[arg-type]
            domain_type=self.domain_type or host_domain_type(host=self.host),
            disks=tuple(
                domxml.DiskSpec(domxml.VolumeRef(self.pool.name, volume), target=target)
                for volume, target in zip(self.volumes, ("vda", "vdb"), strict=False)
            ),
            nics=nics,
            media=media,
            final_boot=t.final_boot,  # type: ignore[arg-type]
            bootloader=t.bootloader_path or None,
            serial_log=str(console_log_path(g.uuid)),
            metadata={
                "request": str(self.request.pk),
                "guest": str(g.pk),
                "template": str(t.pk),
                "template_version": str(self.request.template_version),
            },
        )


def _plan(request: ProvisioningRequest) -> Plan:
    guest = request.guest
    host = request.host
    if guest is None or host is None:
        raise StepFailed("the request has no guest or host")
    template = _template_at(request.template, request.template_version)
    pool = template.pool or host.pools.filter(for_guest_disks=True).first()
    if pool is None or pool.host_id != host.pk:
        raise StepFailed(f"no storage pool for guest disks is registered on {host}")
    return Plan(request, guest, host, template, pool, f"{guest.name}-{guest.uuid.hex[:8]}.qcow2")


def _template_at(template: GuestTemplate, version: int) -> GuestTemplate:
    """The template as it was at `version` (its saved snapshot), or as it is now."""
    if version == template.version:
        return template
    snapshot = TemplateVersion.objects.filter(template=template, version=version).first()
    if snapshot is None:
        return template
    return GuestTemplate(pk=template.pk, version=version, **snapshot.fields)


def _load(request_id: int) -> ProvisioningRequest:
    return ProvisioningRequest.objects.select_related(
        "guest", "host", "template__media__pool", "template__network", "template__pool", "owner"
    ).get(pk=request_id)


def _job_id(plan: Plan) -> int | None:
    if plan.job_id is None:
        job = _job(plan.request)
        plan.job_id = job.pk if job is not None else None
    return plan.job_id


def _move(plan: Plan, expected: Status, to: Status, note: str = "", **fields: Any) -> None:
    transitions.request_move(plan.request.pk, expected=expected, to=to, note=note, **fields)
    plan.request.status = to
    job_id = _job_id(plan)
    if job_id is not None:
        transitions.job_log(job_id, note or f"{Status(to).label}", progress=PROGRESS.get(to))


def _job(request: ProvisioningRequest) -> Job | None:
    return (
        Job.objects.filter(request=request, kind__in=(Job.Kind.PROVISION, Job.Kind.REPROVISION))
        .order_by("-created")
        .first()
    )


class Later(Exception):
    """The step must wait (a guest shutting down); it is queued again after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"again in {seconds} s")


def _admit(plan: Plan) -> None:
    if plan.rebuild:
        # The guest exists and counts against the quota already.
        _move(plan, Status.PENDING, Status.ADMITTED, "Admitted: rebuild of an existing guest")
        return
    with transaction.atomic():
        quotas.quota_lock(plan.request.owner)
        problem = quotas.quota_problem(plan.request)
        if problem:
            raise StepFailed(problem)
        _move(plan, Status.PENDING, Status.ADMITTED, "Admitted within quota")


def _stop_for_rebuild(plan: Plan) -> None:
    """Shut the guest down gracefully, forcing it off once the grace period is over."""
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active:
        return
    now = timezone.now()
    job_id = _job_id(plan)
    if plan.request.deadline is None:
        # A paused guest ignores ACPI; the grace period then ends in a forced off.
        with contextlib.suppress(WrongState):
            operations.shutdown(plan.hv, plan.uuid)
        ProvisioningRequest.objects.filter(pk=plan.request.pk, status=Status.PREPARING).update(
            deadline=now + REBUILD_SHUTDOWN_GRACE
        )
        if job_id is not None:
            transitions.job_log(job_id, "Asked the guest to shut down before the rebuild")
        raise Later(2.0)
    if plan.request.deadline > now:
        raise Later(2.0)
    operations.destroy(plan.hv, plan.uuid)
    if job_id is not None:
        transitions.job_log(job_id, "The guest did not shut down in time; forced off")


def _create_volume(plan: Plan, name: str, mib: int) -> bool:
    """Make an empty volume; False if it exists (an earlier run made it, or a rebuild keeps it)."""
    try:
        storage.create_volume(plan.hv, plan.pool.name, name, mib * MiB, "qcow2")
    except AlreadyExists:
        return False
    except NotFound as exc:
        raise StepFailed(f"storage pool {plan.pool.name} is missing on {plan.host}") from exc
    return True


def _prepare(plan: Plan) -> None:
    data = plan.data_volume
    keep_data = plan.rebuild and plan.request.keep_data_disk
    if plan.rebuild:
        _stop_for_rebuild(plan)
        operations.remove_managed_save(plan.hv, plan.uuid)
        # The system disk is made anew from the template, as on the first install; the data
        # disk too unless the rebuild keeps it. Deleting and making an empty disk again is
        # harmless when a crashed run of this step repeats it.
        storage.delete_volume(plan.hv, plan.pool.name, plan.volume)
        if data and not keep_data:
            storage.delete_volume(plan.hv, plan.pool.name, data)
    if plan.template.method == GuestTemplate.Method.IMPORT:
        try:
            storage.clone_volume(plan.hv, plan.pool.name, plan.template.base_volume, plan.volume)
        except AlreadyExists:
            pass
        except NotFound as exc:
            raise StepFailed(f"base volume {plan.template.base_volume} is missing: {exc}") from exc
    else:
        _create_volume(plan, plan.volume, plan.guest.disk_mib)
    note = f"Disk {plan.volume} ready ({plan.guest.disk_mib} MiB)"
    if data:
        made = _create_volume(plan, data, plan.guest.data_disk_mib)
        what = "kept" if keep_data else "ready"
        if keep_data and made:  # removed behind the portal's back: an empty one will do
            what = "was missing, made anew"
        note += f"; data disk {data} {what} ({plan.guest.data_disk_mib} MiB)"
    faults.checkpoint("preparing:done")
    nxt = Status.INSTALLING if plan.installs else Status.DEFINING
    _move(plan, Status.PREPARING, nxt, note)


def _install(plan: Plan) -> None:
    spec = plan.spec()
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active:
        # Also for a rebuild: createXML starts the inactive persistent guest (same name and
        # UUID) with the installer's config, leaving its persistent config for the next boot.
        install_xml = domxml.install_xml(spec)
        try:
            try:
                # Paused until the final config is in place, so nothing runs half-registered.
                operations.create_transient(plan.hv, install_xml, paused=True)
                paused = True
            except Unsupported:
                operations.create_transient(plan.hv, install_xml)
                paused = False
        except (AlreadyExists, WrongState):
            # A duplicate run of this step got there first (libvirt says "already active" when
            # the guest with this UUID runs): make sure of the final config, as that run does.
            info = operations.get_info(plan.hv, plan.uuid)
            if not info.active:
                raise StepFailed(f"a different guest named {plan.guest.name} exists") from None
            operations.define(plan.hv, domxml.final_xml(spec))
        else:
            faults.checkpoint("installing:created")
            # virt-install's way: the persistent final config exists from the first second, so a
            # crash from here on leaves a guest that only needs starting, never an orphan.
            operations.define(plan.hv, domxml.final_xml(spec))
            if paused:
                operations.resume(plan.hv, plan.uuid)
    else:
        operations.define(plan.hv, domxml.final_xml(spec))
        if info.state == GuestState.PAUSED:
            # An earlier run died between creating the installer paused and resuming it.
            with contextlib.suppress(WrongState):  # a duplicate run resumed it first
                operations.resume(plan.hv, plan.uuid)
    faults.checkpoint("installing:defined")
    deadline = timezone.now() + timedelta(minutes=plan.template.install_timeout_minutes)
    _move(plan, Status.INSTALLING, Status.WAITING, "Installer running", deadline=deadline)
    # The installer may have finished before we started listening. This run goes on with the
    # next step itself: a second runner queued here would only race it.
    info = operations.get_info(plan.hv, plan.uuid)
    if not info.active:
        request_domain_stopped(plan.request.pk, queue_next=False)


def _define(plan: Plan) -> None:
    if not plan.transient:
        operations.define(plan.hv, domxml.final_xml(plan.spec()))
    faults.checkpoint("defining:done")
    _move(plan, Status.DEFINING, Status.STARTING, "Final configuration defined")


def _boot(plan: Plan, boot: Callable[[bool], DomainInfo]) -> DomainInfo:
    """Boot the guest, paused if the request asks; pause it at once where a driver cannot."""
    if not plan.request.start_paused:
        return boot(False)
    try:
        return boot(True)
    except Unsupported:
        # The test driver has no START_PAUSED: the guest runs for a moment, then pauses.
        boot(False)
        return operations.suspend(plan.hv, plan.uuid)


def _start(plan: Plan) -> None:
    r = plan.request
    info = operations.get_info(plan.hv, plan.uuid)
    try:
        if plan.transient and not info.exists:
            xml = domxml.final_xml(plan.spec())
            info = _boot(
                plan,
                lambda paused: operations.create_transient(
                    plan.hv, xml, paused=paused, autodestroy=r.autodestroy
                ),
            )
        elif not info.active:
            info = _boot(plan, lambda paused: operations.start(plan.hv, plan.uuid, paused=paused))
    except (AlreadyExists, WrongState):
        # A duplicate run of this step started it first.
        info = operations.get_info(plan.hv, plan.uuid)
        if not info.active:
            raise
    if r.autostart and not plan.transient and not info.autostart:
        info = operations.set_autostart(plan.hv, plan.uuid, True)
    faults.checkpoint("starting:done")
    guest_sync_state(host=plan.host, info=info)
    # One commit: a worker lost between the two moves would leave the job running forever, as
    # reconcile passes over requests that are final.
    with transaction.atomic():
        _move(plan, Status.STARTING, Status.RUNNING, f"Guest {info.state.value}")
        job_id = _job_id(plan)
        if job_id is not None:
            with contextlib.suppress(transitions.StaleState):  # closed elsewhere: keep the move
                transitions.job_move(job_id, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)


def _noop(status: Status, to: Status) -> Callable[[Plan], None]:
    def step(plan: Plan) -> None:
        _move(plan, status, to)

    return step


STEPS: dict[str, Callable[[Plan], None]] = {
    Status.PENDING: _admit,
    Status.ADMITTED: _noop(Status.ADMITTED, Status.PREPARING),
    Status.PREPARING: _prepare,
    Status.INSTALLING: _install,
    Status.DEFINING: _define,
    Status.STARTING: _start,
}


def advance(request_id: int) -> None:
    """Run the request's steps until it waits for the installer or is final."""
    request = _load(request_id)
    job = _job(request)
    if job is not None and job.status == Job.Status.QUEUED:
        with contextlib.suppress(transitions.StaleState):
            transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    while True:
        step = STEPS.get(request.status)
        if step is None:
            return  # waiting (the listener moves it on) or final
        faults.checkpoint(f"{request.status}:begin")
        try:
            plan = _plan(request)
            plan.job_id = job.pk if job is not None else None
            step(plan)
        except transitions.StaleState as exc:
            # Someone else moved it: another worker ran this step, or the user cancelled.
            log.info("request #%s moved on elsewhere: %s", request_id, exc)
            if exc.actual in (Status.CANCELLED, Status.FAILED):
                cleanup(request_id)
                return
        except Later as later:
            enqueue_advance(request, countdown=later.seconds)
            return
        except (StepFailed, InvalidConfig, domxml.SpecError) as exc:
            fail(request_id, str(exc))
            return
        except NotFound as exc:
            # Something the step needs was removed from libvirt behind the portal's back; the
            # step would fail the same way on every retry, so fail now and clean up.
            fail(request_id, f"it vanished from libvirt: {exc}")
            return
        # Only the request's own columns change between steps (its guest, host and template
        # do not): read those again, not the whole joined plan.
        request.refresh_from_db(fields=_STEP_FIELDS)


_STEP_FIELDS = ["status", "deadline", "error", "updated", "completed"]


def request_domain_stopped(request_id: int, *, queue_next: bool = True) -> None:
    """The installer's domain stopped: a guest-initiated shutdown moves on, anything else fails."""
    request = _load(request_id)
    if request.status != Status.WAITING or request.guest is None or request.host is None:
        return
    info = operations.get_info(get_hypervisor(request.host.uri), str(request.guest.uuid))
    if info.active:
        return  # a reboot inside the installer, or a stale event
    if info.state in (GuestState.DEFINED,) and info.reason == "shutdown":
        try:
            transitions.request_move(
                request_id,
                expected=Status.WAITING,
                to=Status.DEFINING,
                note="Installer finished and powered off",
            )
        except transitions.StaleState:
            return
        job = _job(request)
        if job is not None:
            transitions.job_log(job.pk, "Installer finished", progress=PROGRESS[Status.DEFINING])
        if queue_next:
            enqueue_advance(request)
        return
    what = info.reason if info.exists else "vanished"
    fail(request_id, f"the installer stopped without finishing ({what})")


def fail(request_id: int, error: str) -> None:
    """Fail the request (from any non-final status) and remove what it made."""
    # The request and its job fail in one commit, so nobody sees one failed and the other not.
    with transaction.atomic(), contextlib.suppress(transitions.StaleState):
        transitions.request_move(
            request_id, expected=_ACTIVE_STATUSES, to=Status.FAILED, note=error, error=error
        )
        job = _job(_load(request_id))
        if job is not None and job.status in Job.ACTIVE:
            transitions.job_move(job.pk, expected=Job.ACTIVE, to=Job.Status.FAILED, error=error)
    cleanup(request_id)


def cancel(request_id: int) -> ProvisioningRequest:
    """Cancel a request in any non-final status; cleanup is queued on its host."""
    from provisioning import tasks

    with transaction.atomic():
        request = transitions.request_move(
            request_id, expected=_ACTIVE_STATUSES, to=Status.CANCELLED, note="Cancelled by user"
        )
        host = request.host
        assert host is not None
        transaction.on_commit(
            lambda: send_task(tasks.cleanup_request, (request_id,), queue=host.queue)
        )
    return request


def cleanup(request_id: int) -> None:
    """Remove the domain and disk of a failed or cancelled request, and close its job."""
    request = _load(request_id)
    if request.status not in (Status.FAILED, Status.CANCELLED):
        return
    guest = request.guest
    if guest is not None and request.host is not None and request.kind == request.Kind.REBUILD:
        # A rebuild never removes the guest: stop a running installer, keep the definition.
        hv = get_hypervisor(request.host.uri)
        info = operations.get_info(hv, str(guest.uuid))
        if info.active and request.status != Status.RUNNING:
            info = operations.destroy(hv, str(guest.uuid))
        guest_sync_state(host=request.host, info=info)
    elif guest is not None and request.host is not None:
        hv = get_hypervisor(request.host.uri)
        uuid = str(guest.uuid)
        operations.destroy(hv, uuid)
        operations.undefine(hv, uuid)
        try:
            plan = _plan(request)
        except StepFailed:
            plan = None
        if plan is not None:
            for volume in plan.volumes:
                storage.delete_volume(hv, plan.pool.name, volume)
        guest_sync_state(host=request.host, info=DomainInfo.undefined(uuid))
    job = _job(request)
    if job is not None and job.status in Job.ACTIVE:
        to = Job.Status.CANCELLED if request.status == Status.CANCELLED else Job.Status.FAILED
        with contextlib.suppress(transitions.StaleState):
            transitions.job_move(job.pk, expected=Job.ACTIVE, to=to, error=request.error)


def reconcile_requests(host: Host, domains: dict[str, DomainInfo], *, stale_after: float) -> None:
    """Catch what events missed on one host: stopped installers, deadlines, stalled steps."""
    now = timezone.now()
    for request in ProvisioningRequest.objects.filter(
        host=host, status__in=_ACTIVE_STATUSES
    ).select_related("guest", "host"):
        if request.status == Status.WAITING:
            info = domains.get(str(request.guest.uuid)) if request.guest else None
            if info is None or not info.active:
                request_domain_stopped(request.pk)
            elif request.deadline and request.deadline < now:
                fail(request.pk, "the installer did not finish before the deadline")
        elif (now - request.updated).total_seconds() > stale_after:
            # A worker died mid-step (its message was acknowledged), or the broker was away when
            # the step was queued: run the step again (steps are idempotent). Touching `updated`
            # spaces the retries out.
            log.warning("request #%s stalled in %s; queueing it again", request.pk, request.status)
            ProvisioningRequest.objects.filter(pk=request.pk, status=request.status).update(
                updated=now
            )
            enqueue_advance(request)
    # Failed or cancelled requests whose cleanup never ran (its message was lost).
    for request in ProvisioningRequest.objects.filter(
        host=host,
        status__in=(Status.FAILED, Status.CANCELLED),
        guest__uuid__in=[uuid for uuid in domains],
        guest__state=Guest.State.UNDEFINED,
    ):
        cleanup(request.pk)


__all__ = [
    "HypervisorError",
    "Overrides",
    "StepFailed",
    "SubmitError",
    "advance",
    "cancel",
    "cleanup",
    "fail",
    "reconcile_requests",
    "request_domain_stopped",
    "request_submit",
]
