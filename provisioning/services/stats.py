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
most the bucket in progress. The dashboard's sparklines have a string of their own per guest, the
last 30 CPU readings a byte each, so a page of rows reads 50 short strings in one MGET.

A round's writes are one Redis command (a Lua script doing each guest's pushes, trims, expiries
and sparkline), not a pipeline of four commands a guest: at 1,000 guests the pipeline's encoding
and parsing were most of a round. Each new point is published on the guest's channel too, but
only on the channels a page or an API stream listens on (PUBSUB CHANNELS), so an open guest page
draws it at once and nobody pays for the others. No web request calls libvirt: pages read only
what is stored here.
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
# How many CPU readings the dashboard's sparkline shows (5 minutes at 10 s); a reading is a
# byte of half percents (0-200), 255 when unknown.
SPARK_POINTS = 30
_SPARK_UNKNOWN = 255


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


def spark_key(uuid: object) -> str:
    return f"{PREFIX}stats:{uuid}:spark"


def keys(uuid: object) -> list[str]:
    """Every key a guest's graphs use."""
    return [*(key(uuid, t) for t in TIERS.values()), spark_key(uuid)]


def _spark_byte(cpu: float | None) -> bytes:
    if cpu is None or math.isnan(cpu):
        return bytes((_SPARK_UNKNOWN,))
    return bytes((round(min(max(cpu, 0.0), 100.0) * 2),))


# One round's writes. KEYS: the lists to push to, then the sparklines to extend. ARGV: how many
# lists; each list's record, length and expiry; the sparklines' length and expiry; each
# sparkline's new byte. A list gets its record at the head, is trimmed to its length and set to
# expire; a sparkline gets its byte at the end and loses its oldest past its length.
_ROUND = """
local lists = tonumber(ARGV[1])
for i = 1, lists do
  local at = 3 * i - 1
  redis.call('LPUSH', KEYS[i], ARGV[at])
  redis.call('LTRIM', KEYS[i], 0, tonumber(ARGV[at + 1]) - 1)
  redis.call('EXPIRE', KEYS[i], ARGV[at + 2])
end
local base = 3 * lists + 2
local length, ttl = tonumber(ARGV[base]), ARGV[base + 1]
for i = lists + 1, #KEYS do
  local line = (redis.call('GET', KEYS[i]) or '') .. ARGV[base + 1 + i - lists]
  if #line > length then line = string.sub(line, -length) end
  redis.call('SET', KEYS[i], line, 'EX', ttl)
end
return lists
"""


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


_Point = tuple[float, Sequence[float | None]]  # unix time, values


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
        """Store (uuid, unix time, values) points: one Redis command for the writes, one more
        to publish the points someone is watching; how many points."""
        conn = conn or client()
        lists: list[tuple[str, bytes, Tier]] = []
        sparks: list[tuple[str, bytes]] = []
        latest: dict[str, _Point] = {}
        for uuid, at, values in points:
            lists.append((key(uuid, HOUR), pack(at, values), HOUR))
            for tier in (DAY, WEEK):
                closed = self._average(uuid, tier, at, values)
                if closed is not None:
                    lists.append((key(uuid, tier), pack(*closed), tier))
            sparks.append((spark_key(uuid), _spark_byte(values[0])))
            latest[uuid] = (at, values)
        if not latest:
            return 0
        args: list[Any] = [len(lists)]
        for _name, record, tier in lists:
            args += (record, tier.points, self._ttl(tier))
        args += (SPARK_POINTS, self._ttl(HOUR), *(byte for _name, byte in sparks))
        conn.register_script(_ROUND)(
            keys=[name for name, _record, _tier in lists] + [name for name, _byte in sparks],
            args=args,
        )
        if publish:
            self._publish(conn, latest)
        return len(latest)

    def _ttl(self, tier: Tier) -> int:
        return int(tier.span(self.interval)) + 600

    @staticmethod
    def _publish(conn: redis.Redis, latest: dict[str, _Point]) -> None:
        """Publish each guest's newest point on its channel, if anyone listens there."""
        pattern = guest_channel("*")
        watched = {c.decode() for c in conn.pubsub_channels(pattern)}  # type: ignore[union-attr]
        pipe = conn.pipeline(transaction=False)
        sent = 0
        for uuid, (at, values) in latest.items():
            channel = guest_channel(uuid)
            if channel in watched:
                message = {"stats": {"t": int(at), **_named(values)}}
                pipe.publish(channel, json.dumps(message))
                sent += 1
        if sent:
            pipe.execute()

    def _average(
        self, uuid: str, tier: Tier, at: float, values: Sequence[float | None]
    ) -> tuple[float, list[float | None]] | None:
        """Add the point to the tier's bucket in progress; the (start, means) of a bucket it
        closes, to be stored."""
        assert tier.step is not None
        start = at - at % tier.step
        slot = (uuid, tier.name)
        bucket = self._buckets.get(slot)
        closed = None
        if bucket is None or bucket.start != start:
            if bucket is not None and start > bucket.start:
                closed = (bucket.start, bucket.mean())
            bucket = self._buckets[slot] = _new_bucket(start)
        bucket.add(values)
        return closed

    def forget(self, uuids: Iterable[str]) -> None:
        """Drop the buckets in progress of guests that no longer run here."""
        gone = set(uuids)
        for slot in [s for s in self._buckets if s[0] in gone]:
            del self._buckets[slot]


def _named(values: Sequence[float | None]) -> dict[str, float | None]:
    return {n: (None if v is None else round(v, 3)) for n, v in zip(NAMES, values, strict=True)}


class Sampler:
    """One host's sampling rounds: one bulk libvirt call, rates, one Redis command to store."""

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


def recent_cpu(uuids: Sequence[object]) -> dict[str, list[float]]:
    """The last CPU % of each guest (oldest first), for sparklines; one Redis command."""
    if not uuids:
        return {}
    lines: list[bytes | None] = client().mget([spark_key(u) for u in uuids])  # type: ignore[assignment]
    found: dict[str, list[float]] = {}
    for uuid, line in zip(uuids, lines, strict=True):
        cpu = [b / 2 for b in line or b"" if b != _SPARK_UNKNOWN]
        if cpu:
            found[str(uuid)] = cpu
    return found


def forget_guest(uuid: object) -> None:
    """Remove a guest's series (it was deleted)."""
    try:
        client().delete(*keys(uuid))
    except redis.RedisError as exc:  # they expire by themselves anyway
        log.warning("could not remove the graphs of %s: %s", uuid, exc)
