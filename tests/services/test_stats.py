"""Usage graphs: the listener's sampling rounds, the bounded series in Redis and their reads."""

from __future__ import annotations

import json
import uuid as uuid_module

import pytest

from provisioning.channels import guest_channel
from provisioning.hypervisor import operations
from provisioning.models import Host
from provisioning.services import stats
from tests.conftest import test_hv as driver
from tests.factories import make_guest, make_user
from tests.support.domains import domain_xml
from tests.support.stack import wait_until
from vmportal.heartbeat import client

VALUES = (12.5, 64e6, 4096.0, 1024.0, 100.0, 50.0)


def new_uuid() -> str:
    return str(uuid_module.uuid4())


@pytest.fixture
def uuid() -> str:
    made = new_uuid()
    yield made
    stats.forget_guest(made)


def test_each_point_lands_in_the_hour_at_full_resolution_trimmed_and_expiring(uuid) -> None:
    store = stats.Store(interval=10)
    for i in range(stats.HOUR.points + 40):
        store.write([(uuid, 1_000_000 + 10 * i, VALUES)], publish=False)

    hour = stats.series(uuid, "hour")

    assert len(hour["t"]) == stats.HOUR.points  # the oldest 40 went
    assert hour["t"] == sorted(hour["t"]) and hour["t"][-1] == 1_000_000 + 10 * 399
    assert hour["cpu"][-1] == 12.5 and hour["mem"][-1] == 64e6
    assert hour["step"] == 10 and hour["range"] == "hour"
    ttl = client().ttl(stats.key(uuid, stats.HOUR))
    assert 0 < ttl <= 3600 + 600  # a deleted guest's series go by themselves


def test_the_day_and_week_hold_averages_of_their_buckets_once_each_closes(uuid) -> None:
    store = stats.Store(interval=10)
    start = 1_800_000_000 - 1_800_000_000 % 900  # a week-bucket boundary, so a day one too
    # Two day buckets (2 minutes each) of 12 points: CPU 10 then 30; unknown memory in the second.
    for i in range(12):
        store.write([(uuid, start + 10 * i, (10.0, 1e6, 0, 0, 0, 0))], publish=False)
    for i in range(12, 24):
        store.write([(uuid, start + 10 * i, (30.0, None, 0, 0, 0, 0))], publish=False)
    assert stats.series(uuid, "day")["t"] == [start]  # the second bucket is still open

    store.write([(uuid, start + 900, (50.0, 2e6, 0, 0, 0, 0))], publish=False)

    day = stats.series(uuid, "day")
    assert day["t"] == [start, start + 120]
    assert day["cpu"] == [10.0, 30.0]
    assert day["mem"] == [1e6, None]  # a bucket with no known value stays unknown
    week = stats.series(uuid, "week")
    assert week["t"] == [start] and week["cpu"] == [20.0]
    assert week["step"] == 900


def test_a_guest_with_every_tier_full_stays_under_its_bound(uuid) -> None:
    store = stats.Store(interval=10)
    # A point every 15 minutes closes a bucket of each coarse tier every time: 800 of them fill
    # all three tiers, as a week of sampling would.
    points = [(uuid, 1_700_000_100 + 900 * i, VALUES) for i in range(800)]
    store.write(points, publish=False)
    used = sum(client().memory_usage(name) or 0 for name in stats.keys(uuid))
    lengths = [client().llen(stats.key(uuid, tier)) for tier in stats.TIERS.values()]

    assert lengths == [360, 720, 672]
    assert len(client().get(stats.spark_key(uuid))) == stats.SPARK_POINTS
    assert used <= 200 * 1024, used


def test_a_point_is_published_on_the_guests_channel_for_an_open_page(uuid) -> None:
    pubsub = client().pubsub()
    pubsub.subscribe(guest_channel(uuid))
    wait_until(lambda: pubsub.get_message(timeout=0.1), timeout=5, what="the subscription")

    stats.Store(interval=10).write([(uuid, 1_234_567, VALUES)])

    message = wait_until(
        lambda: pubsub.get_message(timeout=0.1), timeout=5, what="the published point"
    )
    pubsub.close()
    point = json.loads(message["data"])["stats"]
    assert point == {
        "t": 1_234_567,
        "cpu": 12.5,
        "mem": 64e6,
        "disk_read": 4096.0,
        "disk_write": 1024.0,
        "net_rx": 100.0,
        "net_tx": 50.0,
    }


def test_only_the_channels_someone_listens_on_get_the_points(uuid) -> None:
    unwatched = new_uuid()
    pubsub = client().pubsub()
    pubsub.subscribe(guest_channel(uuid))
    # A pattern subscription hears every publish without counting as a listener of a channel.
    pubsub.psubscribe(guest_channel("*"))
    for _ in range(2):
        wait_until(lambda: pubsub.get_message(timeout=0.1), timeout=5, what="the subscriptions")

    stats.Store(interval=10).write([(unwatched, 1_000, VALUES), (uuid, 1_000, VALUES)])

    heard = []
    while message := pubsub.get_message(timeout=1):
        heard.append((message["type"], message["channel"].decode()))
    pubsub.close()
    stored = stats.series(unwatched, "hour")["t"]
    stats.forget_guest(unwatched)
    assert ("message", guest_channel(uuid)) in heard
    assert all(channel == guest_channel(uuid) for _type, channel in heard)
    assert stored == [1_000]  # stored all the same


def test_a_sparkline_keeps_the_last_readings_in_half_percents_and_skips_unknown_ones(
    uuid,
) -> None:
    readings = [float(i) + 0.5 for i in range(35)] + [None, 250.0, -3.0]
    for i, cpu in enumerate(readings):
        # A new store each time, as after a listener restart: the line lives in Redis.
        stats.Store(interval=10).write(
            [(uuid, 1_000 + 10 * i, (cpu, None, None, None, None, None))], publish=False
        )

    line = stats.recent_cpu([uuid])[uuid]

    # The last 30 readings, less the unknown one; out-of-range readings are clamped.
    assert line == [float(i) + 0.5 for i in range(8, 35)] + [100.0, 0.0]
    assert client().ttl(stats.spark_key(uuid)) > 3600  # it goes with the hour's series


def test_recent_cpu_reads_every_row_of_a_page_at_once_and_skips_unsampled_guests(uuid) -> None:
    store = stats.Store(interval=10)
    for i in range(40):
        store.write(
            [(uuid, 1_000 + 10 * i, (float(i), None, None, None, None, None))], publish=False
        )
    other = new_uuid()

    recent = stats.recent_cpu([uuid, other])

    assert list(recent) == [uuid]
    assert recent[uuid] == [float(i) for i in range(10, 40)]  # the last 30, oldest first


def test_a_round_samples_the_portals_running_guests_on_the_host_only(test_host: Host) -> None:
    owner = make_user()
    hv = driver()
    ours = [make_guest(owner=owner, host=test_host) for _ in range(3)]
    for guest in ours:
        operations.create_transient(hv, domain_xml(uuid=str(guest.uuid), name=guest.name))
    stranger = new_uuid()  # a domain someone else runs on the host
    operations.create_transient(hv, domain_xml(uuid=stranger))
    sampler = stats.Sampler(test_host, stats.Store(interval=10))
    try:
        first = sampler.round()  # a rate needs two reads
        second = sampler.round()
        operations.destroy(hv, str(ours[0].uuid))
        third = sampler.round()

        assert (first, second, third) == (0, 3, 2)
        for guest in ours:
            hour = stats.series(guest.uuid, "hour")
            assert len(hour["t"]) == (1 if guest is ours[0] else 2)
            # The test driver reports no counters: the points say unknown, not zero.
            assert hour["cpu"] == [None] * len(hour["t"])
        assert stats.series(stranger, "hour")["t"] == []
    finally:
        for guest in ours:
            stats.forget_guest(guest.uuid)
        operations.destroy(hv, stranger)


def test_forgetting_a_guest_removes_every_tier(uuid) -> None:
    stats.Store(interval=10).write([(uuid, 1_000, VALUES)], publish=False)

    stats.forget_guest(uuid)

    assert all(stats.series(uuid, name)["t"] == [] for name in stats.TIERS)
    assert stats.recent_cpu([uuid]) == {}
