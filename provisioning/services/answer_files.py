"""Serving a request's answer file to its installer: once, while it installs, before it expires."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from provisioning.models import AnswerFile, Job, ProvisioningRequest
from provisioning.services import transitions

# Only while the installer runs: the token dies with the request (cancel, failure, completion).
FETCHABLE = (ProvisioningRequest.Status.INSTALLING, ProvisioningRequest.Status.WAITING)


class AnswerGone(Exception):
    """No answer file for this token now: 404 (never was) or 410 (was, and is not any more)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def answer_fetch(*, token: str, client: str) -> str:
    """The answer file of `token`, marked fetched (by `client`) in the request's job log."""
    now = timezone.now()
    with transaction.atomic():
        row = (
            AnswerFile.objects.select_for_update()
            .select_related("request")
            .filter(token=token)
            .first()
        )
        if row is None:
            raise AnswerGone(404, "no such answer file")
        if row.fetched is not None:
            raise AnswerGone(410, "this answer file was fetched already")
        if row.expires <= now:
            raise AnswerGone(410, "this answer file expired")
        if row.request.status not in FETCHABLE:
            raise AnswerGone(410, "the install this answer file was for is not running")
        row.fetched, row.fetched_from = now, client[:64]
        row.save(update_fields=["fetched", "fetched_from"])
        job = (
            Job.objects.filter(request=row.request, kind__in=Job.FOR_REQUESTS)
            .values_list("pk", flat=True)
            .first()
        )
    if job is not None:
        transitions.job_log(
            job, f"The installer fetched its answer file (from {client or 'an unknown address'})"
        )
    return row.content
