"""What one provision costs the database, measured (the bench keeps the same figure)."""

from __future__ import annotations

from django.db import connection

from provisioning import queue
from provisioning.models import GuestTemplate, Host
from tests.support.cost import provision_cost

MOST_QUERIES = 40


def test_a_provision_costs_at_most_40_queries_from_the_form_to_running(
    make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("cost", quota={"max_guests": 50})
    template = kernel_template
    GuestTemplate.objects.filter(pk=template.pk).update(
        lifecycle=GuestTemplate.Lifecycle.PERSISTENT
    )
    template.refresh_from_db()
    # Warm: the first provision probes the host's domain type and fills Django's caches.
    provision_cost(owner=owner, template=template, name="cost-warm")
    cost = provision_cost(owner=owner, template=template, name="cost-1")
    report = "\n".join(f"{part:8} {sql[:160]}" for part, sql in cost.statements)
    print(f"COST on {connection.vendor}: {cost.total} queries\n{report}")
    assert cost.total <= MOST_QUERIES, (cost.web, cost.worker, cost.listener)
    assert cost.transactions <= 6, cost.transactions
    # The form queues the steps; a guest with no NIC gets no look for addresses after them.
    assert cost.sent == (queue.ADVANCE_REQUEST,)
