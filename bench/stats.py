"""stats_round_ms_1000, stats_bytes_per_guest_day: the usage graphs' sampling and storage.

1,000 guests run on the test driver (transient domains, each with a row on the test host). One
round is what the listener does every interval: `services.stats.Sampler.round()`, one bulk
`getAllDomainStats` call, the rates, one Redis command storing the points, and the publishes of
the points someone watches (none for the figure; the details also give a round with a listener
on every guest's channel). The anchor is the bulk call alone on a raw libvirt-python connection,
in the same run. The storage figure is the Redis memory (MEMORY USAGE) of one guest's three
tiers when all are full, and its sparkline: what a guest costs at any time, whatever its age,
since nothing grows past the tiers' lengths."""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from typing import Any

from bench.common import median, p95, wait_for
from bench.context import Context
from bench.stack import TEST_URI

GUESTS = 1_000


def _domain_xml(uuid: str, name: str) -> str:
    from lxml import etree

    root = etree.Element("domain", type="test")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = "16"
    etree.SubElement(etree.SubElement(root, "os"), "type").text = "hvm"
    return etree.tostring(root, encoding="unicode")


def _storage_per_guest() -> int:
    from provisioning.services import stats
    from vmportal.heartbeat import client

    uuid = str(uuidlib.uuid4())
    store = stats.Store()
    # A point every 15 minutes closes a bucket of each coarse tier each time: 800 fill all three.
    store.write([(uuid, 1_700_000_100 + 900 * i, (1.0,) * 6) for i in range(800)], publish=False)
    try:
        return sum(client().memory_usage(name) or 0 for name in stats.keys(uuid))
    finally:
        stats.forget_guest(uuid)


def _timed(call: Any, count: int) -> tuple[list[float], Any]:
    """Milliseconds of each of `count` calls, and what the last one returned."""
    times: list[float] = []
    result = None
    for _ in range(count):
        start = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - start) * 1000)
    return times, result


def _rounds_watched(sampler: Any, uuids: list[str], count: int) -> list[float]:
    """Rounds (ms) while one listener is subscribed to every guest's channel, as if each had its
    page open: what the publishes cost at most."""
    from provisioning.channels import guest_channel
    from vmportal.heartbeat import client

    pubsub = client().pubsub()
    pubsub.subscribe(*(guest_channel(u) for u in uuids))
    try:
        wait_for(
            lambda: len(client().pubsub_channels(guest_channel("*"))) >= len(uuids),  # type: ignore[arg-type]
            timeout=30,
            what="the subscriptions",
        )
        rounds = []
        for _ in range(count):
            start = time.perf_counter()
            sampler.round()
            rounds.append((time.perf_counter() - start) * 1000)
            while pubsub.get_message(timeout=0):  # keep the listener's buffer drained
                pass
        return rounds
    finally:
        pubsub.close()


def run(ctx: Context) -> dict[str, Any]:
    import libvirt

    from provisioning.hypervisor import stats as hvstats
    from provisioning.models import Guest
    from provisioning.services import stats

    host = ctx.seed.test
    owner = ctx.seed.user
    conn = libvirt.open(TEST_URI)
    uuids = [str(uuidlib.uuid4()) for _ in range(GUESTS)]
    try:
        for i, uuid in enumerate(uuids):
            conn.createXML(_domain_xml(uuid, f"stats-{i:04d}"), 0)
            ctx.made.domain(TEST_URI, uuid)
        Guest.objects.bulk_create(
            [
                Guest(
                    owner=owner,
                    host=host,
                    name=f"stats-{i:04d}",
                    uuid=uuidlib.UUID(uuid),
                    state="running",
                    persistent=False,
                    vcpus=1,
                    memory_mib=16,
                    disk_mib=0,
                )
                for i, uuid in enumerate(uuids)
            ],
            batch_size=500,
        )
        sampler = stats.Sampler(host)
        sampler.round()  # the first read has nothing to rate against
        rounds, stored = _timed(sampler.round, ctx.runs(10, 30))
        if stored < GUESTS:
            raise RuntimeError(f"a round stored {stored} points for {GUESTS} running guests")
        watched = _rounds_watched(sampler, uuids, ctx.runs(5, 10))
        raw, records = _timed(
            lambda: conn.getAllDomainStats(hvstats._GROUPS, hvstats._FLAGS), ctx.runs(10, 30)
        )
        if len(records) < GUESTS:
            raise RuntimeError(f"getAllDomainStats saw {len(records)} of {GUESTS} guests")
    finally:
        for uuid in uuids:
            stats.forget_guest(uuid)
        Guest.objects.filter(uuid__in=uuids).delete()
        for uuid in uuids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByUUIDString(uuid).destroy()
            ctx.made.domains.get(TEST_URI, set()).discard(uuid)
        conn.close()
    per_guest = _storage_per_guest()
    return {
        "figures": {
            "stats_round_ms_1000": p95(rounds),
            "stats_bytes_per_guest_day": per_guest / 1000,
        },
        "details": {
            "stats_round_ms": rounds,
            "stats_round_median_ms": median(rounds),
            "stats_round_all_watched_median_ms": median(watched),
            "stats_raw_bulk_call_median_ms": median(raw),
            "stats_round_vs_raw_bulk_call": median(rounds) / median(raw),
            "stats_bytes_per_guest_full": per_guest,
            "stats_guests": GUESTS,
        },
    }
