"""The Celery app, with heartbeats for /healthz from workers and beat."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmportal.settings")

app = Celery("vmportal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 5.0


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Writes this worker's heartbeat to Redis every few seconds from the worker's timer."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        self._beat(worker)
        self.tref = worker.timer.call_repeatedly(
            HEARTBEAT_EVERY, self._beat, (worker,), priority=10
        )

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()

    def _beat(self, worker: Any) -> None:
        from vmportal import heartbeat

        queues = sorted(q.name for q in worker.app.amqp.queues.consume_from.values())
        try:
            heartbeat.beat("worker", worker.hostname, queues=queues)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the worker
            log.warning("worker heartbeat failed: %s", exc)


app.steps["worker"].add(WorkerHeartbeat)


@worker_process_init.connect
def _audit_as_worker(**_: Any) -> None:
    """Rows a worker's tasks write outside a schedule or reconcile are the worker's."""
    from provisioning.services import audit

    audit.set_process_channel(audit.Channel.WORKER)
