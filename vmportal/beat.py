"""The beat scheduler: django-celery-beat's database scheduler, plus a heartbeat."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler

from vmportal import heartbeat

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 5.0


class HeartbeatScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler, plus a heartbeat at every tick."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            leader = heartbeat.lead("beat", ttl=int(HEARTBEAT_EVERY * 3))
            heartbeat.beat("beat", f"{socket.gethostname()}:{os.getpid()}", leader=leader)
        except Exception as exc:  # noqa: BLE001 - without Redis nothing could be sent anyway
            log.warning("beat heartbeat failed: %s", exc)
            return HEARTBEAT_EVERY
        if not leader:
            # Another beat acts; this one stands by, ready to take over when that one stops.
            return HEARTBEAT_EVERY
        delay = super().tick(*args, **kwargs)
        return min(delay, HEARTBEAT_EVERY)
