"""What one provision costs the database: queries by the web request, the worker and the listener.

Used by the engine's cost test and by `make bench` (queries_per_provision). In this process: the
new-guest form POSTed through Django's test client by a logged-in user, the worker's `advance`
run here (nothing is queued: sends are recorded instead), then the listener's handling of the
two lifecycle events a define and a start raise. Every statement on the default connection
counts as a query except transaction control (BEGIN, COMMIT, savepoints), which is counted
apart, as transactions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from provisioning import queue
from provisioning.models import GuestTemplate, ProvisioningRequest
from provisioning.services import events, provision


@dataclass(frozen=True)
class Cost:
    """Queries (and of them, transactions) spent per part on one provision."""

    web: int
    worker: int
    listener: int
    transactions: int
    request_id: int
    sent: tuple[str, ...]
    statements: tuple[tuple[str, str], ...] = ()  # (part, SQL) of every query, for a report

    @property
    def total(self) -> int:
        return self.web + self.worker + self.listener


CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b", re.I)


def _queries(captured: CaptureQueriesContext) -> int:
    return sum(1 for q in captured.captured_queries if not CONTROL.match(q["sql"]))


@contextmanager
def _counted() -> Iterator[tuple[CaptureQueriesContext, list[int]]]:
    """The queries run on the default connection, and how many transactions committed."""
    commits: list[int] = []
    real = connection.commit

    def commit() -> None:
        commits.append(1)
        real()

    with (
        CaptureQueriesContext(connection) as captured,
        mock.patch.object(connection, "commit", commit),
    ):
        yield captured, commits


def provision_cost(*, owner: AbstractBaseUser, template: GuestTemplate, name: str) -> Cost:
    """Provision one guest of a one-phase template (define + start) and count what it cost."""
    client = Client(HTTP_HOST="127.0.0.1")  # a host the settings allow, in tests and the bench
    client.force_login(owner)
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def record(task: str, *args: Any, queue: str, **options: Any) -> bool:
        sent.append((task, args))
        return True

    fields = {
        "template": template.pk,
        "name": name,
        "vcpus": template.vcpus_default,
        "memory_mib": template.memory_mib_default,
        "disk_mib": template.disk_mib_default,
    }
    with mock.patch.object(queue, "send", record):
        client.get("/")  # a warm-up (Django's first-request work), not counted
        with _counted() as (web, web_tx):
            response = client.post(f"/guests/new?template={template.pk}", fields)
        if response.status_code != 302:
            raise AssertionError(f"the form was refused: {response.status_code}")
        request = ProvisioningRequest.objects.get(name=name, template=template)
        with _counted() as (worker, worker_tx):
            provision.advance(request.pk)
        request.refresh_from_db()
        if request.status != ProvisioningRequest.Status.RUNNING:
            raise AssertionError(f"{name} is {request.status}: {request.error}")
        assert request.guest is not None and request.host is not None
        with _counted() as (listener, listener_tx):
            for _event in ("defined", "started"):
                events.domain_changed(host=request.host, uuid=str(request.guest.uuid))
    return Cost(
        web=_queries(web),
        worker=_queries(worker),
        listener=_queries(listener),
        transactions=len(web_tx) + len(worker_tx) + len(listener_tx),
        request_id=request.pk,
        sent=tuple(name for name, _args in sent),
        statements=tuple(
            (part, q["sql"])
            for part, c in (("web", web), ("worker", worker), ("listener", listener))
            for q in c.captured_queries
            if not CONTROL.match(q["sql"])
        ),
    )
