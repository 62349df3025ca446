"""list_10k_p95_ms, list_10k_queries: the guest list page with 10,000 guests, as staff.

Each row has its CPU sparkline's points stored, as sampled guests do, so the page's one Redis
read for them is in the figure.

The rows are bulk-created on a disabled host (never reconciled) for 100 owners. The figure is the
p95 of full-page GETs of the dashboard over HTTP through the running uvicorn (what a browser
waits for); the query count comes from the same page rendered in this process with Django's
test client and CaptureQueriesContext.
"""

from __future__ import annotations

import random
import re
import time
import uuid as uuidlib
from typing import Any

from bench.common import p95
from bench.context import Context

GUESTS = 10_000
_COUNT = re.compile(r"· (\d+) guests")
OWNERS = 100
OWNER_PREFIX = "owner-"


def _fill(ctx: Context) -> None:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from provisioning.models import Guest

    users = get_user_model()
    users.objects.bulk_create(
        [users(username=f"{OWNER_PREFIX}{i:03d}", password="!") for i in range(OWNERS)]
    )
    owners = list(users.objects.filter(username__startswith=OWNER_PREFIX))
    rng = random.Random(7)
    now = timezone.now()
    states = ["running"] * 6 + ["defined"] * 3 + ["paused"]
    Guest.objects.bulk_create(
        [
            Guest(
                owner=owners[i % OWNERS],
                host=ctx.seed.listing,
                template=ctx.seed.persistent,
                template_version=1,
                name=f"guest-{i:05d}",
                uuid=uuidlib.UUID(int=rng.getrandbits(128), version=4),
                state=rng.choice(states),
                state_changed=now,
                persistent=True,
                vcpus=1,
                memory_mib=512,
                disk_mib=1024,
            )
            for i in range(GUESTS)
        ],
        batch_size=1000,
    )
    # Every row has its CPU sparkline's points, so the page reads and draws them all.
    from provisioning.services import stats

    store = stats.Store()
    uuids = [
        str(u) for u in Guest.objects.filter(host=ctx.seed.listing).values_list("uuid", flat=True)
    ]
    for start in range(0, len(uuids), 500):
        store.write(
            [
                (uuid, 1_000_000 + 10 * i, (float(i), None, None, None, None, None))
                for uuid in uuids[start : start + 500]
                for i in range(stats.SPARK_POINTS)
            ],
            publish=False,
        )


def run(ctx: Context) -> dict[str, Any]:
    """Time the staff dashboard over HTTP; count its queries in-process."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    started = time.monotonic()
    _fill(ctx)
    fill_s = time.monotonic() - started
    session = ctx.session("bench-admin")
    for _ in range(3):
        session.get("/")  # warm the process: templates, connections
    timings: list[float] = []
    for _ in range(ctx.runs(30, 100)):
        start = time.perf_counter()
        answer = session.get("/")
        timings.append((time.perf_counter() - start) * 1000)
        listed = _COUNT.search(answer.body)
        if answer.status != 200 or listed is None or int(listed.group(1)) < GUESTS:
            raise RuntimeError(f"the dashboard did not list {GUESTS} guests (HTTP {answer.status})")

    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(ctx.seed.staff)
    client.get("/")
    local: list[float] = []
    for _ in range(ctx.runs(10, 30)):
        start = time.perf_counter()
        client.get("/")
        local.append((time.perf_counter() - start) * 1000)
    with CaptureQueriesContext(connection) as captured:
        page = client.get("/")
    assert page.status_code == 200
    return {
        "figures": {"list_10k_p95_ms": p95(timings), "list_10k_queries": len(captured)},
        "details": {
            "list_10k_http_ms": timings,
            "list_10k_in_process_p95_ms": p95(local),
            "list_10k_fill_s": fill_s,
            "list_10k_query_sql": [q["sql"][:300] for q in captured.captured_queries],
        },
    }
