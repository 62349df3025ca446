"""The REST API (/api/v1/) with personal tokens, beside the pages it mirrors.

api_guest_list_p95_ms, api_guest_list_queries: GET /api/v1/guests?limit=50 over HTTP through the
running uvicorn with the list bench's 10,000 guests (bench/listing.py seeds them), with a staff
token (every guest) and an owner's (their 100); the worse p95 of the two. Queries are counted
in-process through Django's test client with the same tokens and CaptureQueriesContext.

api_create_to_running_s, api_create_vs_page: the tiny guest's install on real QEMU, POSTed to
/api/v1/requests and followed on its event stream (GET /api/v1/requests/{id}/events, as a script
would instead of polling: 4 polls a second cost the web process 15 ms of CPU each and up to
0.25 s of lateness) until `running`, beside the same
install through the new-guest form as bench/install.py times it, interleaved page, API, API,
page, ...; medians, api / page.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import install, listing
from bench.common import median, p95, process_tree
from bench.context import Context
from bench.stack import QEMU_URI

LIST = "/api/v1/guests?limit=50"
ONE = "/api/v1/guests?limit=1"
# Statuses after which a request moves no more.
FINAL = ("running", "failed", "cancelled")


@dataclass
class Reply:
    """One HTTP answer from the API."""

    status: int
    headers: Any
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw or b"null")


class Api:
    """HTTP calls to the running portal's API with one personal token."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.secret}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return Reply(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read())

    def follow(self, path: str, *, until: Any, timeout: float = 900) -> Any:
        """Read a server-sent event stream; the first event's JSON for which until() is true."""
        req = urllib.request.Request(self.base_url + path)
        req.add_header("Authorization", f"Bearer {self.secret}")
        req.add_header("Accept", "text/event-stream")
        deadline = time.monotonic() + timeout
        with urllib.request.urlopen(req, timeout=60) as resp:
            name, data = "message", []
            while time.monotonic() < deadline:
                line = resp.readline()
                if not line:
                    break
                text = line.decode().rstrip("\n")
                if text.startswith("event:"):
                    name = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].removeprefix(" "))
                elif not text:
                    if name == "close":
                        break
                    if data:
                        event = json.loads("\n".join(data))
                        if until(event):
                            return event
                    name, data = "message", []
        raise RuntimeError(f"{path}: the stream ended before the request did")


def token_for(user: Any, name: str) -> str:
    """A fresh read-write token of the user's (the whole secret)."""
    from provisioning.services.tokens import token_create

    return token_create(user=user, name=name, scope="write", days=1).secret


def _refused(reply: Reply, what: str) -> RuntimeError:
    return RuntimeError(f"{what}: HTTP {reply.status} {reply.raw[:500]!r}")


# --- the guest list ---


def _rows(ctx: Context) -> int:
    """The list bench's 10,000 guests, made here unless it ran first in this run."""
    from provisioning.models import Guest

    rows = Guest.objects.filter(
        host=ctx.seed.listing, owner__username__startswith=listing.OWNER_PREFIX
    )
    if not rows.exists():
        listing._fill(ctx)
    return rows.count()


def _sample(api: Api, runs: int, expect: int, path: str = LIST) -> list[float]:
    """Milliseconds of `runs` GETs of the first page; each must hold `expect` guests."""
    for _ in range(3):
        api.call("GET", path)  # warm the process: this token, connections
    timings: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        reply = api.call("GET", path)
        timings.append((time.perf_counter() - start) * 1000)
        if reply.status != 200 or len(reply.json()["items"]) != expect:
            raise _refused(reply, f"GET {path} did not list {expect} guests")
    return timings


def _walk(api: Api) -> tuple[list[float], int]:
    """Every page of the list through its cursors: milliseconds per page, guests seen."""
    timings: list[float] = []
    seen: set[str] = set()
    path: str | None = LIST
    while path is not None:
        start = time.perf_counter()
        reply = api.call("GET", path)
        timings.append((time.perf_counter() - start) * 1000)
        if reply.status != 200:
            raise _refused(reply, f"GET {path}")
        page = reply.json()
        fresh = {g["uuid"] for g in page["items"]}
        if fresh & seen:
            raise RuntimeError(f"GET {path} repeated guests of earlier pages")
        seen |= fresh
        path = f"{LIST}&cursor={page['next']}" if page["next"] else None
    return timings, len(seen)


def _in_process(secret: str, runs: int) -> tuple[list[float], list[str]]:
    """Milliseconds of GETs of the first page through Django's test client in this process (no
    HTTP, no ASGI), and the SQL of one more, counted."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="127.0.0.1", headers={"authorization": f"Bearer {secret}"})
    client.get(LIST)  # the token's last_used is written at most once a minute: not these calls
    timings: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        client.get(LIST)
        timings.append((time.perf_counter() - start) * 1000)
    with CaptureQueriesContext(connection) as captured:
        answer = client.get(LIST)
    if answer.status_code != 200:
        raise RuntimeError(f"in-process GET {LIST}: HTTP {answer.status_code}")
    return timings, [q["sql"] for q in captured.captured_queries]


def list_run(ctx: Context) -> dict[str, Any]:
    """The first page as staff and as an owner over HTTP; every page as staff; queries."""
    from provisioning.models import Guest

    started = time.monotonic()
    rows = _rows(ctx)
    fill_s = time.monotonic() - started
    # One of the list's own owners (the SSE bench parks a guest of another user there).
    owner = (
        Guest.objects.filter(
            host=ctx.seed.listing, owner__username__startswith=listing.OWNER_PREFIX
        )
        .order_by("pk")
        .first()
    )
    assert owner is not None
    staff_secret = token_for(ctx.seed.staff, "bench list")
    owner_secret = token_for(owner.owner, "bench list")
    runs = ctx.runs(50, 200)
    staff = _sample(Api(ctx.stack.base_url, staff_secret), runs, 50)
    mine = _sample(Api(ctx.stack.base_url, owner_secret), runs, 50)
    # Other tokens: with the samples, the walk's 200 pages would pass one token's rate limit.
    # One guest a page: what every call costs whatever its size (auth, ASGI, HTTP).
    one = _sample(Api(ctx.stack.base_url, token_for(ctx.seed.staff, "bench one")), runs, 1, ONE)
    walk, seen = _walk(Api(ctx.stack.base_url, token_for(ctx.seed.staff, "bench list walk")))
    if seen < rows:
        raise RuntimeError(f"the cursor walk saw {seen} guests, not the {rows} made")
    staff_local, staff_sql = _in_process(staff_secret, ctx.runs(20, 50))
    owner_local, owner_sql = _in_process(owner_secret, ctx.runs(20, 50))
    return {
        "figures": {
            "api_guest_list_p95_ms": max(p95(staff), p95(mine)),
            "api_guest_list_queries": max(len(staff_sql), len(owner_sql)),
        },
        "details": {
            "api_guest_list_staff_p95_ms": p95(staff),
            "api_guest_list_owner_p95_ms": p95(mine),
            "api_guest_list_staff_median_ms": median(staff),
            "api_guest_list_owner_median_ms": median(mine),
            "api_guest_list_staff_in_process_p95_ms": p95(staff_local),
            "api_guest_list_owner_in_process_p95_ms": p95(owner_local),
            "api_guest_list_limit1_p95_ms": p95(one),
            "api_guest_list_limit1_median_ms": median(one),
            "api_guest_list_walk_p95_ms": p95(walk),
            "api_guest_list_walk_pages": len(walk),
            "api_guest_list_staff_ms": staff,
            "api_guest_list_owner_ms": mine,
            "api_guest_list_limit1_ms": one,
            "api_guest_list_walk_ms": walk,
            "api_guest_list_fill_s": fill_s,
            "api_guest_list_staff_sql": [q[:300] for q in staff_sql],
            "api_guest_list_owner_sql": [q[:300] for q in owner_sql],
        },
    }


# --- create to running ---


def api_install(ctx: Context, api: Api, index: int, steps: list[Any]) -> float:
    """POST /api/v1/requests; seconds until GET /api/v1/requests/{id} says running."""
    from provisioning.services.consoles import console_log_path

    name = f"bench-a{index}-{secrets.token_hex(2)}"
    ctx.made.file(install.CONSOLE_DIR / f"{name}.log")  # libvirt's own log of the domain
    body = {
        "template": ctx.seed.demo.pk,
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_mib": install._disk_mib(),
    }
    start = time.monotonic()
    reply = api.call("POST", "/api/v1/requests", body)
    if reply.status != 202:
        raise _refused(reply, "POST /api/v1/requests")
    made = reply.json()
    location, guest_uuid = reply.headers.get("Location", ""), str(made["guest"])
    ctx.made.domain(QEMU_URI, guest_uuid)

    # As a script would: follow the request's event stream until it says running.
    found = api.follow(f"{location}/events", until=lambda r: r["status"] in FINAL)
    if found["status"] != "running":
        raise RuntimeError(f"API request {made['id']} {found['status']}: {found['error']}")
    seconds = time.monotonic() - start
    steps.append(install._timeline(made["id"]))
    install._check_running(guest_uuid)
    ctx.made.remove(QEMU_URI, guest_uuid)
    console_log_path(guest_uuid).unlink(missing_ok=True)
    return seconds


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes and their descendants have used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _around_installer(steps: list[Any]) -> float:
    """Median seconds of all but the installer's own run: until it starts, and from its
    power-off being seen until phase 2 runs (the guest's emulated work swings with the load)."""
    return median([dict(s)["waiting"] + dict(s)["running"] - dict(s)["defining"] for s in steps])


def install_run(ctx: Context) -> dict[str, Any]:
    """Interleaved installs through the form and through the API; the ratio of the medians."""
    runs = ctx.runs(4, 6)
    session = ctx.session("bench")
    api = Api(ctx.stack.base_url, token_for(ctx.seed.user, "bench install"))
    web = ctx.stack.pids("web")
    times: dict[str, list[float]] = {"page": [], "api": []}
    steps: dict[str, list[Any]] = {"page": [], "api": []}
    web_cpu: dict[str, list[float]] = {"page": [], "api": []}
    for index in range(runs):
        # ABBA: neither is always the one that follows the other's removal.
        for arm in ("page", "api") if index % 2 == 0 else ("api", "page"):
            before = _cpu_s(web)
            if arm == "page":
                times[arm].append(install.portal_run(ctx, session, index, steps[arm]))
            else:
                times[arm].append(api_install(ctx, api, index, steps[arm]))
            web_cpu[arm].append(round(_cpu_s(web) - before, 2))
        ctx.log(
            f"api install run {index + 1}/{runs}: page {times['page'][-1]:.2f} s, "
            f"api {times['api'][-1]:.2f} s"
        )
    page, through_api = median(times["page"]), median(times["api"])
    return {
        "figures": {
            "api_create_to_running_s": through_api,
            "api_create_vs_page": through_api / page,
        },
        "details": {
            "api_create_to_running_s": through_api,
            "api_create_page_median_s": page,
            "api_create_seconds": times,
            "api_create_runs": runs,
            "api_create_steps_s": steps,
            "api_create_around_installer_median_s": {
                k: _around_installer(v) for k, v in steps.items()
            },
            "api_create_web_cpu_s": web_cpu,
        },
    }
