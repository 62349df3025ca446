"""Per-guest usage graphs: sampled by the listener, kept in Redis as bounded series, read by pages.

Every round (settings.STATS_INTERVAL seconds) the listener reads every running guest of a host
with one bulk call (`hypervisor.stats.sample`), turns two reads into rates and stores one point
per guest. Three tiers, each a Redis list of fixed-size records, newest first and trimmed to a
fixed length, so nothing grows without bound:

    hour  every round (10 s by default), 360 points
    day   2-minute averages, 720 points
    week  15-minute averages, 672 points

A record is packed binary (a uint32 Unix time and six float32, NaN for unknown): 28 bytes. Each
key expires a little after its tier's span, so a deleted guest's series go by themselves. The
averages are made in the sampler's memory from the points it stores; a listener restart loses at
most the bucket in progress. Each new point is published on the guest's channel too, so an open
guest page draws it at once. No web request calls libvirt: pages read only what is stored here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from django.conf import settings

from provisioning.channels import PREFIX, guest_channel
from provisioning.hypervisor import stats as hvstats
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Guest, Host
from vmportal.heartbeat import client

log = logging.getLogger(__name__)

_RECORD = struct.Struct("<I6f")
RECORD_BYTES = _RECORD.size
FIELDS = hvstats.FIELDS
# The JSON names of the fields, as pages and the API see them.
NAMES = ("cpu", "mem", "disk_read", "disk_write", "net_rx", "net_tx")
_NAN = float("nan")
# How many points of the hour tier the dashboard's sparkline shows (5 minutes at 10 s).
SPARK_POINTS = 30


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    step: float | None  # seconds per point; None: one per round
    points: int

    def span(self, interval: float) -> float:
        return (self.step or interval) * self.points


HOUR = Tier("hour", None, 360)
DAY = Tier("day", 120.0, 720)
WEEK = Tier("week", 900.0, 672)
TIERS = {t.name: t for t in (HOUR, DAY, WEEK)}


def key(uuid: object, tier: Tier) -> str:
    return f"{PREFIX}stats:{uuid}:{tier.name}"


def pack(at: float, values: Sequence[float | None]) -> bytes:
    return _RECORD.pack(int(at), *(_NAN if v is None else float(v) for v in values))


def unpack(record: bytes) -> tuple[int, tuple[float | None, ...]]:
    at, *values = _RECORD.unpack(record)
    return at, tuple(None if math.isnan(v) else v for v in values)


@dataclasses.dataclass
class _Bucket:
    start: float
    sums: list[float]
    counts: list[int]

    def add(self, values: Sequence[float | None]) -> None:
        for i, v in enumerate(values):
            if v is not None and not math.isnan(v):
                self.sums[i] += v
                self.counts[i] += 1

    def mean(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.sums, self.counts, strict=True)]


def _new_bucket(start: float) -> _Bucket:
    return _Bucket(start, [0.0] * len(FIELDS), [0] * len(FIELDS))


class Store:
    """Writes points into the tiers, averaging them into the coarser ones as buckets fill."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = float(interval or settings.STATS_INTERVAL)
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def write(
        self,
        points: Iterable[tuple[str, float, Sequence[float | None]]],
        *,
        publish: bool = True,
        conn: redis.Redis | None = None,
    ) -> int:
        """Store (uuid, unix time, values) points, one Redis round trip in all; how many."""
        pipe = (conn or client()).pipeline(transaction=False)
        written = 0
        for uuid, at, values in points:
            written += 1
            self._push(pipe, uuid, HOUR, at, values)
            for tier in (DAY, WEEK):
                self._average(pipe, uuid, tier, at, values)
            if publish:
                message = {"stats": {"t": int(at), **_named(values)}}
                pipe.publish(guest_channel(uuid), json.dumps(message))
        if written:
            pipe.execute()
        return written

    def _push(
        self, pipe: Any, uuid: str, tier: Tier, at: float, values: Sequence[float | None]
    ) -> None:
        name = key(uuid, tier)
        pipe.lpush(name, pack(at, values))
        pipe.ltrim(name, 0, tier.points - 1)
        pipe.expire(name, int(tier.span(self.interval)) + 600)

    def _average(
        self, pipe: Any, uuid: str, tier: Tier, at: float, values: Sequence[float | None]
    ) -> None:
        assert tier.step is not None
        start = at - at % tier.step
        slot = (uuid, tier.name)
        bucket = self._buckets.get(slot)
        if bucket is None or bucket.start != start:
            if bucket is not None and start > bucket.start:
                self._push(pipe, uuid, tier, bucket.start, bucket.mean())
            bucket = self._buckets[slot] = _new_bucket(start)
        bucket.add(values)

    def forget(self, uuids: Iterable[str]) -> None:
        """Drop the buckets in progress of guests that no longer run here."""
        gone = set(uuids)
        for slot in [s for s in self._buckets if s[0] in gone]:
            del self._buckets[slot]


def _named(values: Sequence[float | None]) -> dict[str, float | None]:
    return {n: (None if v is None else round(v, 3)) for n, v in zip(NAMES, values, strict=True)}


class Sampler:
    """One host's sampling rounds: one bulk libvirt call, rates, one Redis round trip."""

    def __init__(self, host: Host, store: Store | None = None) -> None:
        self.host = host
        self.store = store or Store()
        self._last: dict[str, hvstats.Counters] = {}

    def round(self) -> int:
        """Sample every running guest of the host once; how many points were stored."""
        read = hvstats.sample(get_hypervisor(self.host.uri))
        # Only the portal's guests: a domain someone else runs on the host is not ours to graph.
        ours = {str(u) for u in Guest.objects.filter(host=self.host).values_list("uuid", flat=True)}
        now = time.time()
        points = []
        for uuid, counters in read.items():
            if uuid not in ours:
                continue
            before = self._last.get(uuid)
            if before is not None:
                points.append((uuid, now, hvstats.rates(before, counters).values()))
        gone = [uuid for uuid in self._last if uuid not in read or uuid not in ours]
        self.store.forget(gone)
        self._last = {u: c for u, c in read.items() if u in ours}
        return self.store.write(points)


# --- reading -----------------------------------------------------------------------------


def series(uuid: object, tier_name: str, *, conn: redis.Redis | None = None) -> dict[str, Any]:
    """A guest's points in one tier, oldest first, as columns: {"t": [...], "cpu": [...], ...}."""
    tier = TIERS[tier_name]
    records: list[bytes] = (conn or client()).lrange(key(uuid, tier), 0, tier.points - 1)  # type: ignore[assignment]
    columns: dict[str, list[Any]] = {"t": [], **{n: [] for n in NAMES}}
    for record in reversed(records):
        at, values = unpack(record)
        columns["t"].append(at)
        for n, v in zip(NAMES, values, strict=True):
            columns[n].append(None if v is None else round(v, 3))
    step = tier.step or float(settings.STATS_INTERVAL)
    return {"range": tier.name, "step": step, "points": tier.points, **columns}


def recent_cpu(uuids: Sequence[object], points: int = SPARK_POINTS) -> dict[str, list[float]]:
    """The last CPU % of each guest (oldest first), for sparklines; one Redis round trip."""
    if not uuids:
        return {}
    pipe = client().pipeline(transaction=False)
    for uuid in uuids:
        pipe.lrange(key(uuid, HOUR), 0, points - 1)
    found: dict[str, list[float]] = {}
    for uuid, records in zip(uuids, pipe.execute(), strict=True):
        cpu = [v for v in (unpack(r)[1][0] for r in reversed(records)) if v is not None]
        if cpu:
            found[str(uuid)] = cpu
    return found


def forget_guest(uuid: object) -> None:
    """Remove a guest's series (it was deleted)."""
    try:
        client().delete(*(key(uuid, t) for t in TIERS.values()))
    except redis.RedisError as exc:  # they expire by themselves anyway
        log.warning("could not remove the graphs of %s: %s", uuid, exc)
