"""Usage counters from one bulk call, and the rates between two reads."""

from __future__ import annotations

import pytest

from provisioning.hypervisor import stats
from provisioning.hypervisor.connection import Hypervisor
from provisioning.hypervisor.operations import create_transient, define

# A running QEMU guest's record as libvirt 9 gives it (the keys getAllDomainStats documents).
QEMU_RECORD = {
    "state.state": 1,
    "cpu.time": 4_000_000_000,
    "vcpu.current": 2,
    "vcpu.maximum": 2,
    "balloon.current": 262_144,
    "balloon.rss": 180_000,
    "block.count": 2,
    "block.0.rd.bytes": 1_000,
    "block.0.wr.bytes": 10,
    "block.1.rd.bytes": 500,
    "block.1.wr.bytes": 20,
    "net.count": 1,
    "net.0.rx.bytes": 7_000,
    "net.0.tx.bytes": 300,
}


def test_counters_add_every_disk_and_interface_and_take_memory_from_the_qemu_process() -> None:
    c = stats.counters_of(QEMU_RECORD, at=5.0)

    assert (c.cpu_ns, c.vcpus) == (4_000_000_000, 2)
    assert (c.disk_read_bytes, c.disk_write_bytes) == (1_500, 30)
    assert (c.net_rx_bytes, c.net_tx_bytes) == (7_000, 300)
    assert (c.mem_used_bytes, c.mem_total_bytes) == (180_000 * 1024, 262_144 * 1024)


def test_memory_comes_from_inside_the_guest_when_its_balloon_driver_reports() -> None:
    record = {**QEMU_RECORD, "balloon.available": 200_000, "balloon.unused": 150_000}

    c = stats.counters_of(record, at=0.0)

    assert (c.mem_used_bytes, c.mem_total_bytes) == (50_000 * 1024, 200_000 * 1024)


def test_a_driver_that_reports_only_the_state_gives_unknowns_not_zeros() -> None:
    c = stats.counters_of({"state.state": 1, "state.reason": 0}, at=0.0)

    assert (c.cpu_ns, c.vcpus, c.mem_used_bytes, c.disk_read_bytes, c.net_tx_bytes) == (None,) * 5
    assert stats.rates(c, stats.counters_of({}, at=10.0)).values() == (None,) * 6


def test_rates_are_per_second_and_cpu_is_a_share_of_all_vcpus() -> None:
    before = stats.counters_of(QEMU_RECORD, at=100.0)
    later = {
        **QEMU_RECORD,
        "cpu.time": 4_000_000_000 + 5_000_000_000,  # 5 s of CPU in 10 s on 2 vCPUs: 25 %
        "block.0.rd.bytes": 1_000 + 40_960,
        "block.1.wr.bytes": 20 + 10_240,
        "net.0.rx.bytes": 7_000 + 1_000,
    }

    r = stats.rates(before, stats.counters_of(later, at=110.0))

    assert r.cpu_percent == pytest.approx(25.0)
    assert (r.disk_read_bps, r.disk_write_bps) == (4_096.0, 1_024.0)
    assert (r.net_rx_bps, r.net_tx_bps) == (100.0, 0.0)
    assert r.mem_used_bytes == 180_000 * 1024


def test_a_counter_that_went_down_gives_no_rate_and_cpu_never_passes_100() -> None:
    before = stats.counters_of(QEMU_RECORD, at=0.0)
    restarted = {**QEMU_RECORD, "cpu.time": 1, "net.0.rx.bytes": 0, "block.0.rd.bytes": 0}
    busy = {**QEMU_RECORD, "cpu.time": 4_000_000_000 + 2_100_000_000}

    after_restart = stats.rates(before, stats.counters_of(restarted, at=1.0))
    clamped = stats.rates(before, stats.counters_of(busy, at=1.0))

    assert (after_restart.cpu_percent, after_restart.net_rx_bps) == (None, None)
    assert after_restart.disk_read_bps is None
    assert clamped.cpu_percent == 100.0
    assert stats.rates(before, before).values() == (None,) * 6  # no time passed


def test_one_call_reads_every_running_guest_and_leaves_out_stopped_ones(
    test_hv: Hypervisor, make_guest
) -> None:
    running = [make_guest() for _ in range(3)]
    for _uuid, xml in running:
        create_transient(test_hv, xml)
    stopped, xml = make_guest()
    define(test_hv, xml)

    read = stats.sample(test_hv)

    assert {u for u, _ in running} <= set(read)
    assert stopped not in read
    # The test driver reports states only: the counters are unknown, never made up.
    assert read[running[0][0]].cpu_ns is None


def test_a_rates_values_come_in_the_order_of_its_fields() -> None:
    rates = stats.Rates(1.0, 2.0, 3.0, None, 5.0, 6.0)

    assert dict(zip(stats.FIELDS, rates.values(), strict=True)) == {
        "cpu_percent": 1.0,
        "mem_used_bytes": 2.0,
        "disk_read_bps": 3.0,
        "disk_write_bps": None,
        "net_rx_bps": 5.0,
        "net_tx_bps": 6.0,
    }
