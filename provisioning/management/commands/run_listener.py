"""Runs the libvirt event listener for every enabled host, keeping the portal true to libvirt."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections
from django.utils import timezone

from provisioning import queue
from provisioning.hypervisor.errors import HypervisorError
from provisioning.hypervisor.events import EventListener, LifecycleEvent
from provisioning.models import Host
from provisioning.services import addresses, audit, consoles, events, stats
from provisioning.services.hosts import host_ensure_local
from vmportal import heartbeat

log = logging.getLogger("vmportal.listener")
HEARTBEAT_EVERY = 2.0


class Command(BaseCommand):
    help = "Listen to libvirt lifecycle events on every enabled host and apply them."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--host",
            action="append",
            dest="hosts",
            help="Listen to this host only (repeatable); default: every enabled host.",
        )

    def handle(self, *args: Any, hosts: list[str] | None = None, **options: Any) -> None:
        if not hosts or not Host.objects.exists():
            host_ensure_local()  # a fresh install: the local libvirt is the first host
        chosen = Host.objects.filter(enabled=True)
        if hosts:
            chosen = chosen.filter(name__in=hosts)
        listened = list(chosen)
        if not listened:
            raise CommandError("no enabled host to listen to")
        self._run(listened)

    def _run(self, hosts: list[Host]) -> None:
        stop = threading.Event()
        connected: dict[str, bool] = {h.name: False for h in hosts}
        listeners = [self._listener(host, connected) for host in hosts]
        for listener in listeners:
            listener.start()
        samplers = [
            threading.Thread(
                target=self._sample, args=(host, stop), daemon=True, name=f"stats {host}"
            )
            for host in hosts
        ]
        for sampler in samplers:
            sampler.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        tailer = consoles.ConsoleTailer(hosts)
        me = socket.gethostname()
        log.info("listening to %s", ", ".join(f"{h.name} ({h.uri})" for h in hosts))
        beat_due = 0.0
        while not stop.is_set():
            close_old_connections()
            try:
                tailer.poll()
            except Exception:
                log.exception("console tailing failed")
            beat_due -= consoles.POLL_EVERY
            if beat_due <= 0:
                beat_due = HEARTBEAT_EVERY
                for host in hosts:
                    try:
                        heartbeat.beat(
                            "listener", f"{host.name}@{me}", connected=connected[host.name]
                        )
                    except Exception as exc:  # noqa: BLE001 - keep listening while Redis is away
                        log.warning("listener heartbeat failed: %s", exc)
                    if connected[host.name]:
                        # The host's health for placement and pages: seen now, through libvirt.
                        Host.objects.filter(pk=host.pk).update(last_seen=timezone.now())
            stop.wait(consoles.POLL_EVERY)
        for listener in listeners:
            listener.stop()
        for sampler in samplers:
            sampler.join(timeout=10)

    def _sample(self, host: Host, stop: threading.Event) -> None:
        """The host's usage graphs: one sampling round every STATS_INTERVAL seconds."""
        sampler = stats.Sampler(host)
        interval = float(settings.STATS_INTERVAL)
        due = time.monotonic()
        while not stop.is_set():
            close_old_connections()
            try:
                sampler.round()
            except Exception as exc:  # noqa: BLE001 - a host away or Redis away: try next round
                log.warning("%s: a sampling round failed: %s", host, exc)
            # On a fixed beat, not interval after each round ends: rates stay per interval.
            due += interval
            stop.wait(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic() - interval)

    def _listener(self, host: Host, connected: dict[str, bool]) -> EventListener:
        def on_event(event: LifecycleEvent) -> None:
            close_old_connections()
            try:
                if event.event == "agent":
                    addresses.agent_changed(
                        host=host, uuid=event.uuid, connected=event.detail == "connected"
                    )
                    return
                with audit.acting(audit.Channel.LISTENER):
                    events.domain_changed(host=host, uuid=event.uuid)
            except HypervisorError as exc:
                log.warning("%s: cannot apply %s of %s: %s", host, event.event, event.uuid, exc)

        def on_state(up: bool) -> None:
            was = connected[host.name]
            connected[host.name] = up
            if up and not was:
                # Events may have been missed while away: look at everything once (reconcile
                # runs on its schedule too, should the broker be away now).
                queue.send(queue.RECONCILE_HOST, host.pk, queue=host.queue, expires=60)

        return EventListener(host.uri, on_event, on_state=on_state)
