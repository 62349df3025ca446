"""How requests leave their steps: the installer's end, failure, cancel, clean-up, reconcile."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from provisioning import faults, queue
from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import Guest, Host, Job, ProvisioningRequest
from provisioning.services import audit, transitions
from provisioning.services.guests import guest_sync_state
from provisioning.services.provision.spec import StepFailed, load_request, plan_of

log = logging.getLogger(__name__)
Status = ProvisioningRequest.Status


def enqueue_advance(request: ProvisioningRequest) -> bool:
    """Queue the request's next step on its host's queue now; False if the broker is away."""
    assert request.host is not None
    return queue.send(queue.ADVANCE_REQUEST, request.pk, queue=request.host.queue)


def request_domain_stopped(
    request_id: int, *, queue_next: bool = True, info: DomainInfo | None = None
) -> bool:
    """The installer's domain stopped: a guest-initiated shutdown moves on, anything else fails.

    True when the request moved on to defining its final config. `info` is libvirt's view of
    the domain when the caller has just read it.
    """
    request = ProvisioningRequest.objects.select_related("guest", "host").get(pk=request_id)
    if request.status != Status.WAITING or request.guest is None or request.host is None:
        return False
    if info is None:
        info = operations.get_info(get_hypervisor(request.host.uri), str(request.guest.uuid))
    if info.active:
        return False  # a reboot inside the installer, or a stale event
    if info.state == GuestState.DEFINED and info.reason == "shutdown":
        job = transitions.request_job_ref(request)
        try:
            transitions.request_step(
                request_id,
                expected=Status.WAITING,
                to=Status.DEFINING,
                note="Installer finished and powered off",
                job=job,
                lines=["Installer finished"],
                progress=85,
            )
        except transitions.StaleState:
            return False
        if queue_next:
            enqueue_advance(request)
        return True
    what = info.reason if info.exists else "vanished"
    fail(request_id, f"the installer stopped without finishing ({what})")
    return False


def fail(request_id: int, error: str) -> None:
    """Fail the request (from any non-final status) and remove what it made."""
    # The request and its job fail in one commit, so nobody sees one failed and the other not.
    with transaction.atomic(), contextlib.suppress(transitions.StaleState):
        transitions.request_move(
            request_id,
            expected=ProvisioningRequest.ACTIVE,
            to=Status.FAILED,
            note=error,
            error=error,
            cleanup_pending=True,
        )
        request = ProvisioningRequest.objects.select_related("guest").get(pk=request_id)
        job = transitions.request_job_ref(request)
        if job is not None and job.status in Job.ACTIVE:
            transitions.job_move(
                job.id,
                expected=Job.ACTIVE,
                to=Job.Status.FAILED,
                error=error,
                guest_uuid=job.guest_uuid,
            )
    cleanup(request_id)


def cancel(request_id: int) -> None:
    """Cancel a request in any non-final status; cleanup is queued on its host."""
    request = ProvisioningRequest.objects.select_related("host").get(pk=request_id)
    try:
        with transaction.atomic():
            transitions.request_move(
                request_id,
                expected=ProvisioningRequest.ACTIVE,
                to=Status.CANCELLED,
                note="Cancelled by user",
                cleanup_pending=True,
            )
            audit.record(
                "request.cancel", request, changes={"status": (request.status, Status.CANCELLED)}
            )
            assert request.host is not None
            queue.send_on_commit(queue.CLEANUP_REQUEST, request_id, queue=request.host.queue)
    except transitions.TransitionError as exc:
        audit.refused("request.cancel", request, str(exc))
        raise


def cleanup(request_id: int) -> None:
    """Remove the domain and disk of a failed or cancelled request, and close its job."""
    request = load_request(request_id)
    if request.status not in (Status.FAILED, Status.CANCELLED):
        return
    guest = request.guest
    if guest is not None and request.host is not None and request.kind == request.Kind.REBUILD:
        # A rebuild never removes the guest: stop a running installer, keep the definition.
        hv = get_hypervisor(request.host.uri)
        info = operations.get_info(hv, str(guest.uuid))
        if info.active:
            info = operations.destroy(hv, str(guest.uuid))
        guest_sync_state(host=request.host, info=info, guest=guest)
    elif guest is not None and request.host is not None:
        hv = get_hypervisor(request.host.uri)
        uuid = str(guest.uuid)
        operations.destroy(hv, uuid)
        operations.undefine(hv, uuid)
        faults.checkpoint("cleanup:undefined")  # the crash tests die here, before the disks go
        try:
            plan = plan_of(request)
        except StepFailed:
            plan = None
        if plan is not None:
            for volume in plan.volumes:
                storage.delete_volume(hv, plan.pool.name, volume)
        guest_sync_state(host=request.host, info=DomainInfo.undefined(uuid), guest=guest)
    job = transitions.request_job_ref(request)
    # The job's end and the flag in one commit: nobody sees the job over with the clean-up
    # still pending.
    with transaction.atomic():
        if job is not None and job.status in Job.ACTIVE:
            to = Job.Status.CANCELLED if request.status == Status.CANCELLED else Job.Status.FAILED
            with contextlib.suppress(transitions.StaleState):
                transitions.job_move(
                    job.id,
                    expected=Job.ACTIVE,
                    to=to,
                    error=request.error,
                    guest_uuid=job.guest_uuid,
                )
        if request.cleanup_pending:
            ProvisioningRequest.objects.filter(pk=request_id).update(cleanup_pending=False)


def reconcile_requests(host: Host, domains: dict[str, DomainInfo], *, stale_after: float) -> None:
    """Catch what events missed on one host: stopped installers, deadlines, stalled steps."""
    now = timezone.now()
    for request in ProvisioningRequest.objects.filter(
        host=host, status__in=ProvisioningRequest.ACTIVE
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
    # Failed or cancelled requests whose clean-up never ran (its message was lost) or was cut
    # short (its worker died between removing the domain and the disks), and older ones whose
    # domain is back. Touching `updated` spaces the retries out, as above.
    leftover = ProvisioningRequest.objects.filter(
        host=host, status__in=(Status.FAILED, Status.CANCELLED)
    ).filter(
        Q(cleanup_pending=True, updated__lt=now - timedelta(seconds=stale_after))
        | Q(guest__uuid__in=list(domains), guest__state=Guest.State.UNDEFINED)
    )
    for pk in leftover.values_list("pk", flat=True):
        log.warning("request #%s was not cleaned up; cleaning up now", pk)
        ProvisioningRequest.objects.filter(pk=pk).update(updated=now)
        cleanup(pk)
