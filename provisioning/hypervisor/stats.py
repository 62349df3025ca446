"""What every running guest of a host is using, from one bulk call, and rates between two reads.

One `getAllDomainStats` call per host and round reads every active domain's counters (CPU time,
memory, block and interface bytes); per-domain calls would cost a round trip per guest. The
counters only grow while a guest runs, so a rate is the difference of two reads over the time
between them; a counter that went down (the guest was restarted) gives no rate for that round.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from .connection import Hypervisor

_GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
# Running and paused guests only: a stopped one uses nothing and has no counters.
_FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE


@dataclasses.dataclass(frozen=True, slots=True)
class Counters:
    """One domain's cumulative counters at one moment (None: the driver does not report it)."""

    at: float  # time.monotonic() of the read
    cpu_ns: int | None
    vcpus: int | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    disk_read_bytes: int | None
    disk_write_bytes: int | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Rates:
    """What a guest used between two reads (None: unknown for this interval)."""

    cpu_percent: float | None  # of its vCPUs together: 100 is every vCPU busy all the time
    mem_used_bytes: float | None
    disk_read_bps: float | None
    disk_write_bps: float | None
    net_rx_bps: float | None
    net_tx_bps: float | None

    def values(self) -> tuple[float | None, ...]:
        # In FIELDS' order; written out, as dataclasses.astuple deep-copies (a tenth of a round).
        return (
            self.cpu_percent,
            self.mem_used_bytes,
            self.disk_read_bps,
            self.disk_write_bps,
            self.net_rx_bps,
            self.net_tx_bps,
        )


FIELDS = tuple(f.name for f in dataclasses.fields(Rates))


def _sum(stats: Mapping[str, Any], group: str, count_key: str, field: str) -> int | None:
    count = stats.get(count_key)
    if count is None:
        return None
    total, seen = 0, False
    for i in range(int(count)):
        value = stats.get(f"{group}.{i}.{field}")
        if value is not None:
            total += int(value)
            seen = True
    return total if seen or count == 0 else None


def counters_of(stats: Mapping[str, Any], at: float) -> Counters:
    """Counters from one domain's getAllDomainStats record."""
    # Inside the guest's view when its balloon driver reports it (available minus unused);
    # else what the QEMU process holds on the host (rss); else nothing known.
    available, unused = stats.get("balloon.available"), stats.get("balloon.unused")
    if available is not None and unused is not None:
        used: int | None = (int(available) - int(unused)) * 1024
        total: int | None = int(available) * 1024
    else:
        rss = stats.get("balloon.rss")
        used = int(rss) * 1024 if rss is not None else None
        current = stats.get("balloon.current")
        total = int(current) * 1024 if current is not None else None
    vcpus = stats.get("vcpu.current")
    cpu = stats.get("cpu.time")
    return Counters(
        at=at,
        cpu_ns=int(cpu) if cpu is not None else None,
        vcpus=int(vcpus) if vcpus is not None else None,
        mem_used_bytes=used,
        mem_total_bytes=total,
        disk_read_bytes=_sum(stats, "block", "block.count", "rd.bytes"),
        disk_write_bytes=_sum(stats, "block", "block.count", "wr.bytes"),
        net_rx_bytes=_sum(stats, "net", "net.count", "rx.bytes"),
        net_tx_bytes=_sum(stats, "net", "net.count", "tx.bytes"),
    )


def sample(hv: Hypervisor) -> dict[str, Counters]:
    """Every active domain's counters on the host, by UUID, from one call."""

    def read(conn: libvirt.virConnect) -> list[tuple[libvirt.virDomain, dict[str, Any]]]:
        return conn.getAllDomainStats(_GROUPS, _FLAGS)

    records = hv.call(read)
    at = time.monotonic()
    return {dom.UUIDString(): counters_of(stats, at) for dom, stats in records}


def _per_second(before: int | None, now: int | None, seconds: float) -> float | None:
    if before is None or now is None or now < before:
        return None
    return (now - before) / seconds


def rates(before: Counters, now: Counters) -> Rates:
    """What the guest used between two reads of its counters."""
    seconds = now.at - before.at
    if seconds <= 0:
        return Rates(None, None, None, None, None, None)
    cpu: float | None = None
    ns = _per_second(before.cpu_ns, now.cpu_ns, seconds)
    if ns is not None and now.vcpus:
        # Clamped: two reads a little apart in the host's clock can round past 100.
        cpu = min(100.0, ns / 1e9 / now.vcpus * 100.0)
    return Rates(
        cpu_percent=cpu,
        mem_used_bytes=float(now.mem_used_bytes) if now.mem_used_bytes is not None else None,
        disk_read_bps=_per_second(before.disk_read_bytes, now.disk_read_bytes, seconds),
        disk_write_bps=_per_second(before.disk_write_bytes, now.disk_write_bytes, seconds),
        net_rx_bps=_per_second(before.net_rx_bytes, now.net_rx_bytes, seconds),
        net_tx_bps=_per_second(before.net_tx_bytes, now.net_tx_bytes, seconds),
    )


def is_known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)
