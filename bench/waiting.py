"""waiting_action_p95_ms, waiting_rss_kb_per_install: 500 installs waiting for their installer.

An install that waits for its installer must hold no worker slot and little memory. With 500 of
them waiting on the test driver (their installers "run" until someone shuts them down), a user
suspends an unrelated running guest again and again: the figure is the p95 of the time from the
job being queued to the worker starting it (Job.created to Job.started). Memory is the growth of
the worker's and the listener's process trees (VmRSS) from before the 500 were submitted to after
all of them wait, divided by 500.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import p95, rss_kb, wait_for
from bench.context import Context
from bench.stack import TEST_URI

WAITING = 500


def _provision(ctx: Context, template: Any, name: str) -> Any:
    from provisioning.models import ProvisioningRequest
    from provisioning.services.provision import Overrides, request_submit

    made = request_submit(owner=ctx.seed.user, template=template, overrides=Overrides(name=name))

    def running() -> bool:
        return ProvisioningRequest.objects.get(pk=made.pk).status == "running"

    wait_for(running, timeout=60, what=f"{name} to run")
    assert made.guest is not None
    ctx.made.domain(TEST_URI, str(made.guest.uuid))
    return made.guest


def _job_done(job_id: int) -> Any:
    from provisioning.models import Job

    def final() -> Any:
        job = Job.objects.get(pk=job_id)
        if job.status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job.status}: {job.error}")
        return job if job.status == "succeeded" else None

    return wait_for(final, timeout=120, what=f"job {job_id}")


def _queues_empty(ctx: Context) -> bool:
    from vmportal.heartbeat import client

    conn = client()
    return all(conn.llen(q) == 0 for q in ("default", ctx.seed.test.queue))


def run(ctx: Context) -> dict[str, Any]:
    """Fill the waiting room, then time suspends of an unrelated guest."""
    from provisioning.models import Guest, ProvisioningRequest
    from provisioning.services.actions import guest_action
    from provisioning.services.provision import Overrides, request_submit

    target = _provision(ctx, ctx.seed.persistent, "wait-target")
    wait_for(lambda: _queues_empty(ctx), timeout=60, what="the queues to drain")
    trees = ctx.stack.pids("worker", "listener")
    before = rss_kb(trees)

    start = time.monotonic()
    for i in range(WAITING):
        made = request_submit(
            owner=ctx.seed.user,
            template=ctx.seed.kernel,
            overrides=Overrides(name=f"wait-{i:04d}"),
        )
        assert made.guest is not None
        ctx.made.domain(TEST_URI, str(made.guest.uuid))
    submitted = time.monotonic() - start
    requests = ProvisioningRequest.objects.filter(name__startswith="wait-", host=ctx.seed.test)

    def all_waiting() -> bool:
        failed = requests.filter(status__in=("failed", "cancelled")).first()
        if failed is not None:
            raise RuntimeError(f"request {failed.pk} {failed.status}: {failed.error}")
        return requests.filter(status="waiting").count() == WAITING

    wait_for(all_waiting, timeout=900, what=f"{WAITING} installs to wait", every=0.2)
    filled = time.monotonic() - start
    wait_for(lambda: _queues_empty(ctx), timeout=120, what="the queues to drain")
    after = rss_kb(trees)
    ctx.log(f"waiting: {WAITING} installs waiting after {filled:.1f} s; timing suspends")

    delays: list[float] = []
    for _ in range(ctx.runs(10, 40)):
        target = Guest.objects.select_related("host").get(pk=target.pk)
        job = _job_done(guest_action(guest=target, kind="suspend", by=ctx.seed.user).pk)
        delays.append((job.started - job.created).total_seconds() * 1000)
        target = Guest.objects.select_related("host").get(pk=target.pk)
        _job_done(guest_action(guest=target, kind="resume", by=ctx.seed.user).pk)
    still = requests.filter(status="waiting").count()
    if still != WAITING:
        raise RuntimeError(f"only {still} of {WAITING} installs still wait after the suspends")
    return {
        "figures": {
            "waiting_action_p95_ms": p95(delays),
            "waiting_rss_kb_per_install": (after - before) / WAITING,
        },
        "details": {
            "waiting_installs": WAITING,
            "waiting_suspend_delays_ms": delays,
            "waiting_rss_kb_before": before,
            "waiting_rss_kb_after": after,
            "waiting_submit_s": submitted,
            "waiting_fill_s": filled,
        },
    }
