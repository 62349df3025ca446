"""Celery tasks: thin, short and idempotent. Each takes ids, re-reads rows and calls one service.

Long waits never hold a slot: an install's wait ends by a libvirt event (the listener) or by the
periodic reconcile, which also re-queues steps whose worker died.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings

from provisioning.hypervisor.errors import Busy, ConnectionLost
from provisioning.models import Host

log = logging.getLogger(__name__)
# Passing failures: the task runs again later, with backoff.
RETRY_ON = (ConnectionLost, Busy)


@shared_task(
    name="provisioning.advance_request",
    autoretry_for=RETRY_ON,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def advance_request(request_id: int) -> None:
    """Run a provisioning request's next steps, up to the installer wait or the end."""
    from provisioning.services import provision

    provision.advance(request_id)


@shared_task(
    name="provisioning.cleanup_request",
    autoretry_for=RETRY_ON,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def cleanup_request(request_id: int) -> None:
    """Remove what a cancelled or failed request made."""
    from provisioning.services import provision

    provision.cleanup(request_id)


@shared_task(
    name="provisioning.run_job",
    autoretry_for=RETRY_ON,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def run_job(job_id: int) -> None:
    """Run one lifecycle job on a guest."""
    from provisioning.services import actions

    actions.run_job(job_id)


@shared_task(
    name="provisioning.domain_changed",
    autoretry_for=RETRY_ON,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def domain_changed(host_id: int, uuid: str) -> None:
    """Apply one domain's current state (queued by the listener for work that calls libvirt)."""
    from provisioning.services import events

    events.domain_changed(host=Host.objects.get(pk=host_id), uuid=uuid)


@shared_task(name="provisioning.reconcile")
def reconcile() -> None:
    """Fan out a reconcile pass to every enabled host's queue."""
    for host in Host.objects.filter(enabled=True):
        reconcile_host.apply_async((host.pk,), queue=host.queue, expires=60)


@shared_task(
    name="provisioning.reconcile_host",
    autoretry_for=RETRY_ON,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def reconcile_host(host_id: int) -> dict[str, Any]:
    """Make one host's rows true to libvirt and catch missed events and stalled steps."""
    from provisioning.services import events

    return events.reconcile_host(Host.objects.get(pk=host_id))


@shared_task(name="provisioning.scheduled_rebuild")
def scheduled_rebuild(schedule_id: int) -> None:
    """A rebuild schedule fired (sent by beat)."""
    from provisioning.services import schedules

    schedules.schedule_fire(schedule_id)


@shared_task(
    name="provisioning.run_migration",
    soft_time_limit=settings.MIGRATION_TIME_LIMIT - 60,
    time_limit=settings.MIGRATION_TIME_LIMIT,
)
def run_migration(job_id: int) -> None:
    """Migrate a guest to another host (runs on the source host's queue)."""
    from provisioning.services import migrations

    migrations.run_migration(job_id)
