"""Queueing work for the Celery workers by task name: the only way the portal asks for a task.

Callers know a task's stable name, never its module, so nothing imports `tasks.py` but Celery
(Zulip's queue_json_publish, Celery's send_task). A send that fails because the broker is away
is logged and dropped: every row that waits for work is found again by the periodic reconcile.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app
from django.db import transaction

log = logging.getLogger(__name__)

# The tasks' stable names (provisioning/tasks.py registers them under these).
ADVANCE_REQUEST = "provisioning.advance_request"
CLEANUP_REQUEST = "provisioning.cleanup_request"
RUN_JOB = "provisioning.run_job"
RUN_MIGRATION = "provisioning.run_migration"
RECONCILE = "provisioning.reconcile"
RECONCILE_HOST = "provisioning.reconcile_host"
SCHEDULED_REBUILD = "provisioning.scheduled_rebuild"
LOOK_FOR_ADDRESSES = "provisioning.look_for_addresses"
PRUNE_AUDIT = "provisioning.prune_audit"
NAMES = frozenset(
    {
        ADVANCE_REQUEST,
        CLEANUP_REQUEST,
        RUN_JOB,
        RUN_MIGRATION,
        RECONCILE,
        RECONCILE_HOST,
        SCHEDULED_REBUILD,
        LOOK_FOR_ADDRESSES,
        PRUNE_AUDIT,
    }
)


def send(name: str, *args: Any, queue: str, **options: Any) -> bool:
    """Queue task `name` now; False (logged) when the broker cannot take it."""
    if name not in NAMES:
        raise ValueError(f"no task is called {name}")
    try:
        current_app.send_task(name, args, queue=queue, **options)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds when Redis is down
        log.warning("could not queue %s%s (reconcile will): %s", name, args, exc)
        return False
    return True


def send_on_commit(name: str, *args: Any, queue: str, **options: Any) -> None:
    """Queue task `name` once the current transaction commits (at once outside one)."""
    if name not in NAMES:
        raise ValueError(f"no task is called {name}")
    transaction.on_commit(lambda: send(name, *args, queue=queue, **options))
