"""The beat scheduler: django-celery-beat's database scheduler, plus a heartbeat."""

from __future__ import annotations

import logging
import os
from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler

from vmportal import heartbeat

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 5.0


class HeartbeatScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler, plus a heartbeat at every tick."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            heartbeat.beat("beat", "scheduler", pid=os.getpid())
        except Exception as exc:  # noqa: BLE001
            log.warning("beat heartbeat failed: %s", exc)
        delay = super().tick(*args, **kwargs)
        return min(delay, HEARTBEAT_EVERY)
