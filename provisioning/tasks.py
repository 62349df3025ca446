"""Celery tasks: thin, short and idempotent. Each takes ids, re-reads rows and calls one service.

Nothing imports this module but Celery's autodiscovery: the portal queues a task by its name
through `provisioning.queue`. Long waits never hold a slot: an install's wait ends by a libvirt
event (the listener) or by the periodic reconcile, which also re-queues steps whose worker died.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings

from provisioning import queue
from provisioning.hypervisor.errors import Busy, ConnectionLost
from provisioning.models import Host
from provisioning.services import (
    actions,
    addresses,
    audit,
    events,
    migrate,
    provision,
    schedules,
)

log = logging.getLogger(__name__)
# Passing failures: the task runs again later, with backoff.
RETRIED: dict[str, Any] = {
    "autoretry_for": (ConnectionLost, Busy),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 20,
}


@shared_task(name=queue.ADVANCE_REQUEST, **RETRIED)
def advance_request(request_id: int) -> None:
    """Run a provisioning request's next steps, up to the installer wait or the end."""
    provision.advance(request_id)


@shared_task(name=queue.CLEANUP_REQUEST, **RETRIED)
def cleanup_request(request_id: int) -> None:
    """Remove what a cancelled or failed request made."""
    provision.cleanup(request_id)


@shared_task(name=queue.RUN_JOB, **RETRIED)
def run_job(job_id: int) -> None:
    """Run one lifecycle job on a guest."""
    actions.run_job(job_id)


@shared_task(name=queue.RECONCILE)
def reconcile() -> None:
    """Fan out a reconcile pass to every enabled host's queue."""
    for host in Host.objects.filter(enabled=True):
        queue.send(queue.RECONCILE_HOST, host.pk, queue=host.queue, expires=60)


@shared_task(name=queue.RECONCILE_HOST, **RETRIED)
def reconcile_host(host_id: int) -> dict[str, Any]:
    """Make one host's rows true to libvirt and catch missed events and stalled steps."""
    return events.reconcile_host(Host.objects.get(pk=host_id))


@shared_task(name=queue.LOOK_FOR_ADDRESSES, **RETRIED)
def look_for_addresses(guest_id: int, since: str, attempt: int) -> None:
    """One look for a started guest's addresses (it queues the next one itself)."""
    addresses.look_after_start(guest_id, since, attempt)


@shared_task(name=queue.SCHEDULED_REBUILD)
def scheduled_rebuild(schedule_id: int) -> None:
    """A rebuild schedule fired (sent by beat)."""
    schedules.schedule_fire(schedule_id)


@shared_task(
    name=queue.RUN_MIGRATION,
    soft_time_limit=settings.MIGRATION_TIME_LIMIT - 60,
    time_limit=settings.MIGRATION_TIME_LIMIT,
)
def run_migration(job_id: int) -> None:
    """Migrate a guest to another host (runs on the source host's queue)."""
    migrate.run_migration(job_id)


@shared_task(name=queue.PRUNE_AUDIT)
def prune_audit() -> dict[str, int]:
    """Remove audit rows past the retention period and Idempotency-Keys past theirs (beat)."""
    gone = {
        "audit_events": audit.prune(days=settings.AUDIT_RETENTION_DAYS),
        "idempotency_keys": audit.prune_idempotency_keys(hours=settings.API_IDEMPOTENCY_HOURS),
    }
    log.info("pruned %(audit_events)d audit rows, %(idempotency_keys)d idempotency keys", gone)
    return gone
