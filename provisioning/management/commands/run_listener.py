"""Runs the libvirt event listener for every enabled host, keeping guest rows fresh."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.hypervisor.events import EventListener, LifecycleEvent
from provisioning.models import Host
from provisioning.services.guests import guest_sync_state
from provisioning.services.hosts import host_ensure_local
from vmportal import heartbeat

log = logging.getLogger("vmportal.listener")
HEARTBEAT_EVERY = 5.0


class Command(BaseCommand):
    help = "Listen to libvirt lifecycle events on every enabled host and apply them."

    def handle(self, *args: Any, **options: Any) -> None:
        host_ensure_local()
        hosts = list(Host.objects.filter(enabled=True))
        stop = threading.Event()
        connected: dict[str, bool] = {h.name: False for h in hosts}
        listeners = [self._listener(host, connected) for host in hosts]
        for listener in listeners:
            listener.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        me = socket.gethostname()
        log.info("listening to %s", ", ".join(f"{h.name} ({h.uri})" for h in hosts))
        while not stop.is_set():
            for host in hosts:
                try:
                    heartbeat.beat("listener", f"{host.name}@{me}", connected=connected[host.name])
                except Exception as exc:  # noqa: BLE001 - keep listening while Redis is away
                    log.warning("listener heartbeat failed: %s", exc)
            stop.wait(HEARTBEAT_EVERY)
        for listener in listeners:
            listener.stop()

    def _listener(self, host: Host, connected: dict[str, bool]) -> EventListener:
        def on_event(event: LifecycleEvent) -> None:
            self._apply(host, event)

        def on_state(up: bool) -> None:
            connected[host.name] = up

        return EventListener(host.uri, on_event, on_state=on_state)

    def _apply(self, host: Host, event: LifecycleEvent) -> None:
        close_old_connections()
        try:
            info = operations.get_info(get_hypervisor(host.uri, readonly=True), event.uuid)
        except HypervisorError as exc:
            log.warning("%s: cannot read %s after %s: %s", host, event.uuid, event.event, exc)
            return
        guest_sync_state(host=host, info=info)
