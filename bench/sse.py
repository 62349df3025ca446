"""sse_1000_p95_ms: 1,000 concurrent progress watchers on one server process, event latency.

1,000 logged-in clients hold the request page's SSE stream (`/requests/<pk>/events`) open on the
one uvicorn process. Each round does what the listener's console tailer does while an installer
runs: a line lands in the guest's serial console log and `job_log(kind=console)` records it and
publishes on the job's channel. A sample is the time from that call to one client reading the
re-rendered status partial that shows the line; p95 over every client and round.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid as uuidlib
from typing import Any

from bench.common import p95, wait_for
from bench.context import Context

WATCHERS = 1000
# Watchers arrive in bursts of this many. Every request in flight holds a database connection in
# a thread of its own; a PostgreSQL without a pool refuses bursts near its max_connections (100).
CONNECT_AT_ONCE = 25
TICK = re.compile(rb"bench-tick-(\d+)")
ROUND_TIMEOUT = 60.0


class Watcher:
    """One SSE client: when it saw each tick."""

    def __init__(self) -> None:
        self.first_frame = asyncio.Event()
        self.seen: dict[int, float] = {}
        self.error = ""

    async def watch(self, port: int, path: str, cookie: str) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            self.first_frame.set()
            return
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sessionid={cookie}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )
        try:
            status = await reader.readline()
            if b" 200 " not in status:
                self.error = status.decode(errors="replace").strip()
                return
            while line := await reader.readline():
                now = time.time()
                if line.startswith(b"event: status"):
                    self.first_frame.set()
                for match in TICK.finditer(line):
                    self.seen.setdefault(int(match.group(1)), now)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = f"read: {exc}"
        finally:
            self.first_frame.set()
            writer.close()


def _watched_request(ctx: Context) -> tuple[int, int, Any]:
    """A request that waits for its installer, on the disabled host (no reconcile touches it)."""
    from provisioning.models import Guest, Job, ProvisioningRequest

    guest = Guest.objects.create(
        owner=ctx.seed.user,
        host=ctx.seed.listing,
        template=ctx.seed.kernel,
        template_version=1,
        name="sse-watched",
        uuid=uuidlib.uuid4(),
        vcpus=1,
        memory_mib=256,
        disk_mib=64,
    )
    request = ProvisioningRequest.objects.create(
        owner=ctx.seed.user,
        template=ctx.seed.kernel,
        template_version=1,
        host=ctx.seed.listing,
        guest=guest,
        name=guest.name,
        vcpus=1,
        memory_mib=256,
        disk_mib=64,
        status=ProvisioningRequest.Status.WAITING,
    )
    job = Job.objects.create(
        kind=Job.Kind.PROVISION, guest=guest, request=request, status=Job.Status.RUNNING
    )
    return request.pk, job.pk, guest.uuid


def _tick(job_id: int, console: Any, n: int) -> None:
    """What the console tailer does with a new console line."""
    from provisioning.models import JobEvent
    from provisioning.services import transitions

    line = f"bench-tick-{n}\n"
    with console.open("a") as f:
        f.write(line)
    transitions.job_log(job_id, line, kind=JobEvent.Kind.CONSOLE)


async def _rounds(ctx: Context, watchers: list[Watcher], job_id: int, console: Any) -> list[float]:
    samples: list[float] = []
    for n in range(ctx.runs(3, 10)):
        start = time.time()
        await asyncio.to_thread(_tick, job_id, console, n)
        deadline = time.monotonic() + ROUND_TIMEOUT
        while time.monotonic() < deadline and any(n not in w.seen for w in watchers):
            await asyncio.sleep(0.01)
        late = sum(n not in w.seen for w in watchers)
        samples += [w.seen.get(n, start + ROUND_TIMEOUT) - start for w in watchers]
        ctx.log(
            f"sse round {n + 1}: p95 {p95(samples[-len(watchers) :]) * 1000:.0f} ms, {late} late"
        )
        await asyncio.sleep(0.5)
    return samples


async def _bench(ctx: Context, port: int, path: str, cookie: str, job_id: int, console: Any) -> Any:
    watchers = [Watcher() for _ in range(WATCHERS)]
    start = time.monotonic()
    tasks = []
    for i in range(0, WATCHERS, CONNECT_AT_ONCE):
        batch = watchers[i : i + CONNECT_AT_ONCE]
        tasks += [asyncio.create_task(w.watch(port, path, cookie)) for w in batch]
        await asyncio.gather(*(w.first_frame.wait() for w in batch))
    connected = time.monotonic() - start
    broken = [w.error for w in watchers if w.error]
    if broken:
        raise RuntimeError(f"{len(broken)} SSE clients failed: {broken[:3]}")
    ctx.log(f"sse: {WATCHERS} watchers connected in {connected:.1f} s")
    samples = await _rounds(ctx, watchers, job_id, console)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return samples, connected


def _streams_closed() -> bool:
    from vmportal.heartbeat import client

    return int(client().info("clients")["connected_clients"]) < 100


def run(ctx: Context) -> dict[str, Any]:
    """1,000 watchers of one request; p95 of publish-to-receipt."""
    from provisioning.services.consoles import console_log_path

    request_id, job_id, guest_uuid = _watched_request(ctx)
    console = console_log_path(guest_uuid)
    ctx.made.file(console)
    console.write_text("")
    session = ctx.session("bench")
    port = int(ctx.stack.base_url.rsplit(":", 1)[1])
    path = f"/requests/{request_id}/events"
    samples, connected = asyncio.run(
        _bench(ctx, port, path, session.cookie("sessionid"), job_id, console)
    )
    # The next figure must not pay for closing these streams: wait until their Redis
    # subscriptions are gone (each stream holds one).
    wait_for(_streams_closed, timeout=60, what="the SSE streams to close", every=0.2)
    return {
        "figures": {"sse_1000_p95_ms": p95(samples) * 1000},
        "details": {
            "sse_watchers": WATCHERS,
            "sse_connect_all_s": connected,
            "sse_median_ms": sorted(samples)[len(samples) // 2] * 1000,
            "sse_samples": len(samples),
        },
    }
