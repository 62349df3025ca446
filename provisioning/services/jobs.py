"""A user's ask for a job on a guest (a lifecycle action, a snapshot): audited, opened, queued.

Why an ask is refused is the caller's to say (`actions.refusal`, `snapshots.refusal`); this
module does the rest of every ask, the same way for all of them.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from provisioning import queue
from provisioning.models import Guest, Job
from provisioning.services import audit, transitions


def job_ask(
    guest: Guest,
    kind: str,
    by: AbstractBaseUser | None,
    action: str,
    *,
    refused: tuple[str | None, type[Exception]],
    data: dict[str, Any],
    note: str,
    about: str = "",
    changes: dict[str, tuple[Any, Any]] | None = None,
) -> Job:
    """Ask for a job on the guest, audited under `action`: refused with `refused`'s exception
    when its reason is not None, GuestBusy when the guest has a job already; otherwise the job
    and its audit record in one commit, and the job queued on the guest's host after it.

    `about` leads the audit record's detail, before the job's number.
    """
    reason, error = refused
    if reason is not None:
        audit.refused(action, guest, reason, by=by)
        raise error(reason)
    try:
        with transaction.atomic():
            job = transitions.job_open(
                kind=Job.Kind(kind), guest=guest, created_by=by, data=data, note=note
            )
            detail = f"{about} (job #{job.pk})" if about else f"job #{job.pk}"
            audit.record(action, guest, by=by, detail=detail, changes=changes or {})
            queue.send_on_commit(queue.RUN_JOB, job.pk, queue=guest.host.queue)
    except transitions.GuestBusy as exc:
        audit.refused(action, guest, str(exc), by=by)
        raise
    return job
