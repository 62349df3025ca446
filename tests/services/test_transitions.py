"""Status changes of requests and jobs: the table, compare-and-swap, history and publishing."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.db import connections, transaction

from provisioning.models import (
    Guest,
    GuestTemplate,
    Job,
    JobEvent,
    ProvisioningRequest,
    RequestEvent,
)
from provisioning.services import transitions as t
from provisioning.services.transitions import (
    JOB_MOVES,
    REQUEST_MOVES,
    GuestBusy,
    IllegalTransition,
    StaleState,
    job_log,
    job_move,
    job_open,
    request_move,
)
from tests import factories
from tests.support.stack import RedisServer, free_port

Status = ProvisioningRequest.Status
JobStatus = Job.Status

ALLOWED = [(a, b) for a, moves in REQUEST_MOVES.items() for b in sorted(moves)]
DISALLOWED = [(a, b) for a in Status for b in Status if b not in REQUEST_MOVES[a]]
JOB_ALLOWED = [(a, b) for a, moves in JOB_MOVES.items() for b in sorted(moves)]
JOB_DISALLOWED = [(a, b) for a in JobStatus for b in JobStatus if b not in JOB_MOVES[a]]


def _ids(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture
def owner(db: None) -> User:
    return factories.make_user("owner")


@pytest.fixture
def make_request(owner: User) -> Callable[..., ProvisioningRequest]:
    template = factories.make_template(
        name="imp", method=GuestTemplate.Method.IMPORT, base_volume="base.qcow2"
    )

    def make(status: str = Status.PENDING, **fields: Any) -> ProvisioningRequest:
        values: dict[str, Any] = {
            "owner": owner,
            "template": template,
            "template_version": template.version,
            "name": f"g-{uuid.uuid4().hex[:8]}",
            "vcpus": 1,
            "memory_mib": 256,
            "disk_mib": 512,
            "status": status,
        }
        values.update(fields)
        return ProvisioningRequest.objects.create(**values)

    return make


@pytest.fixture
def guest(owner: User) -> Guest:
    host = factories.make_host("hv1", pool=None)
    return factories.make_guest(owner=owner, host=host, name="web1", state=Guest.State.UNDEFINED)


def _snapshot(req: ProvisioningRequest) -> tuple[Any, ...]:
    row = ProvisioningRequest.objects.get(pk=req.pk)
    return (row.status, row.updated, row.completed, row.error, row.events.count())


# The table -----------------------------------------------------------------------------------


def test_the_tables_final_states_are_the_models() -> None:
    assert {s for s, moves in REQUEST_MOVES.items() if not moves} == ProvisioningRequest.FINAL
    assert {s for s, moves in JOB_MOVES.items() if not moves} == Job.FINAL
    assert set(Job.FINAL) == set(JobStatus) - set(Job.ACTIVE)
    assert set(ProvisioningRequest.ACTIVE) == set(Status) - ProvisioningRequest.FINAL
    assert set(ProvisioningRequest.BUILDING) == set(ProvisioningRequest.ACTIVE) - {Status.PENDING}
    assert set(REQUEST_MOVES) == set(Status)
    assert set(JOB_MOVES) == set(JobStatus)


def test_it_derives_cancellable_and_final_from_the_table() -> None:
    assert t.is_cancellable(Status.WAITING)
    assert not t.is_cancellable(Status.RUNNING)
    assert not t.is_cancellable(Status.CANCELLED)
    assert t.is_final("failed")
    assert not t.is_final("pending")
    assert t.can_move(Status.PREPARING, Status.DEFINING)
    assert not t.can_move(Status.PENDING, Status.RUNNING)
    assert t.job_is_cancellable(JobStatus.QUEUED)
    assert t.job_is_final(JobStatus.SUCCEEDED)
    assert not t.job_can_move(JobStatus.SUCCEEDED, JobStatus.RUNNING)


# Requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "to"), ALLOWED, ids=map(_ids, ALLOWED))
def test_it_makes_every_allowed_move_and_records_it(
    make_request: Callable[..., ProvisioningRequest], start: Status, to: Status
) -> None:
    req = make_request(start)
    before = ProvisioningRequest.objects.get(pk=req.pk).updated

    request_move(req.pk, expected=start, to=to, note="because")

    moved = ProvisioningRequest.objects.get(pk=req.pk)
    assert moved.status == to
    assert moved.updated > before
    assert ProvisioningRequest.objects.get(pk=req.pk).status == to
    events = list(req.events.values_list("from_status", "to_status", "note"))
    assert events == [(start, to, "because")]


@pytest.mark.parametrize(("start", "to"), DISALLOWED, ids=map(_ids, DISALLOWED))
def test_it_refuses_every_move_outside_the_table_and_changes_nothing(
    make_request: Callable[..., ProvisioningRequest], start: Status, to: Status
) -> None:
    req = make_request(start)
    before = _snapshot(req)

    with pytest.raises(IllegalTransition):
        request_move(req.pk, expected=start, to=to)

    assert _snapshot(req) == before


def test_it_refuses_a_move_when_any_expected_status_may_not_make_it(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.ADMITTED)
    with pytest.raises(IllegalTransition, match="running"):
        request_move(req.pk, expected=[Status.ADMITTED, Status.RUNNING], to=Status.CANCELLED)
    assert ProvisioningRequest.objects.get(pk=req.pk).status == Status.ADMITTED


def test_it_raises_stale_state_naming_the_actual_status_and_changes_nothing(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.INSTALLING)
    before = _snapshot(req)

    with pytest.raises(StaleState) as caught:
        request_move(req.pk, expected=Status.ADMITTED, to=Status.PREPARING)

    assert caught.value.actual == Status.INSTALLING
    assert "installing" in str(caught.value)
    assert not caught.value.already_there
    assert _snapshot(req) == before


def test_a_duplicate_worker_sees_the_move_already_done(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.ADMITTED)
    request_move(req.pk, expected=Status.ADMITTED, to=Status.PREPARING)

    with pytest.raises(StaleState) as caught:
        request_move(req.pk, expected=Status.ADMITTED, to=Status.PREPARING)

    assert caught.value.already_there
    assert req.events.count() == 1


def test_it_records_which_of_several_expected_statuses_the_request_left(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.WAITING)

    request_move(
        req.pk,
        expected=[Status.PENDING, Status.INSTALLING, Status.WAITING],
        to=Status.CANCELLED,
        note="user asked",
    )

    event = req.events.get()
    assert (event.from_status, event.to_status) == (Status.WAITING, Status.CANCELLED)


def test_final_moves_set_completed_and_others_do_not(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.STARTING)
    other = make_request(Status.PENDING)

    request_move(req.pk, expected=Status.STARTING, to=Status.RUNNING)
    request_move(other.pk, expected=Status.PENDING, to=Status.ADMITTED)
    running = ProvisioningRequest.objects.get(pk=req.pk)
    admitted = ProvisioningRequest.objects.get(pk=other.pk)

    assert running.completed is not None
    assert running.completed == running.updated
    assert admitted.completed is None


def test_it_sets_extra_fields_in_the_same_update(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.DEFINING)

    request_move(req.pk, expected=Status.DEFINING, to=Status.FAILED, error="XML_ERROR: bad disk")
    failed = ProvisioningRequest.objects.get(pk=req.pk)

    assert failed.error == "XML_ERROR: bad disk"
    assert failed.completed is not None


def test_it_refuses_fields_that_the_move_owns(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.PENDING)
    with pytest.raises(TypeError, match="completed"):
        request_move(req.pk, expected=Status.PENDING, to=Status.ADMITTED, completed=None)
    assert ProvisioningRequest.objects.get(pk=req.pk).status == Status.PENDING


def test_it_keeps_request_events_in_order(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    req = make_request(Status.PENDING)
    path = [Status.ADMITTED, Status.PREPARING, Status.DEFINING, Status.STARTING, Status.RUNNING]
    current = Status.PENDING
    for step in path:
        request_move(req.pk, expected=current, to=step)
        current = step

    moves = list(RequestEvent.objects.filter(request=req).values_list("from_status", "to_status"))
    assert moves == list(zip([Status.PENDING, *path[:-1]], path, strict=True))


def _race(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls at the same moment, each in its own thread and DB connection."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[object] = [None] * len(calls)

    def run(slot: int) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[slot] = calls[slot]()
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever happened
            outcomes[slot] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_two_workers_racing_for_one_move_leave_exactly_one_winner(
    make_request: Callable[..., ProvisioningRequest],
) -> None:
    for _ in range(20):
        req = make_request(Status.ADMITTED)

        def claim(req_id: int = req.pk) -> object:
            request_move(req_id, expected=Status.ADMITTED, to=Status.PREPARING)
            return "moved"

        outcomes = _race([claim, claim])

        winners = [o for o in outcomes if o == "moved"]
        losers = [o for o in outcomes if isinstance(o, StaleState)]
        assert len(winners) == 1, outcomes
        assert len(losers) == 1, outcomes
        assert losers[0].actual == Status.PREPARING
        assert losers[0].already_there
        assert req.events.count() == 1


# Jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "to"), JOB_ALLOWED, ids=map(_ids, JOB_ALLOWED))
def test_it_makes_every_allowed_job_move_and_logs_it(
    guest: Guest, start: JobStatus, to: JobStatus
) -> None:
    job = Job.objects.create(kind=Job.Kind.START, guest=guest, status=start)

    job_move(job.pk, expected=start, to=to)

    assert Job.objects.get(pk=job.pk).status == to
    event = job.events.get()
    assert event.kind == JobEvent.Kind.STATE
    assert event.message == f"{start.label} → {to.label}"


@pytest.mark.parametrize(("start", "to"), JOB_DISALLOWED, ids=map(_ids, JOB_DISALLOWED))
def test_it_refuses_every_job_move_outside_the_table(
    guest: Guest, start: JobStatus, to: JobStatus
) -> None:
    job = Job.objects.create(kind=Job.Kind.START, guest=guest, status=start)

    with pytest.raises(IllegalTransition):
        job_move(job.pk, expected=start, to=to)

    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.started, row.completed, row.events.count()) == (start, None, None, 0)


def test_job_move_stamps_started_then_completed(guest: Guest) -> None:
    job = job_open(kind=Job.Kind.SHUTDOWN, guest=guest)
    assert (job.started, job.completed) == (None, None)

    job_move(job.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)
    running = Job.objects.get(pk=job.pk)
    assert running.started is not None
    assert running.completed is None

    job_move(job.pk, expected=JobStatus.RUNNING, to=JobStatus.SUCCEEDED)
    done = Job.objects.get(pk=job.pk)
    assert done.started == running.started
    assert done.completed is not None
    assert done.completed >= done.started
    assert done.progress == 100


def test_a_failed_job_keeps_its_error_and_progress(guest: Guest) -> None:
    job = job_open(kind=Job.Kind.REBOOT, guest=guest)
    job_move(job.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)

    job_move(
        job.pk, expected=JobStatus.RUNNING, to=JobStatus.FAILED, error="domain gone", progress=40
    )
    failed = Job.objects.get(pk=job.pk)

    assert (failed.status, failed.error, failed.progress) == (JobStatus.FAILED, "domain gone", 40)
    assert failed.completed is not None
    last = failed.events.last()
    assert last is not None
    assert last.message == "Running → Failed: domain gone"


def test_a_stale_job_move_names_the_actual_status(guest: Guest) -> None:
    job = job_open(kind=Job.Kind.START, guest=guest)
    job_move(job.pk, expected=JobStatus.QUEUED, to=JobStatus.CANCELLED)

    with pytest.raises(StaleState) as caught:
        job_move(job.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)

    assert caught.value.actual == JobStatus.CANCELLED
    assert Job.objects.get(pk=job.pk).started is None


def test_job_log_appends_a_line_and_moves_progress(guest: Guest) -> None:
    job = job_open(kind=Job.Kind.PROVISION, guest=guest)

    [first] = job_log(job.pk, "cloning base volume", kind=JobEvent.Kind.STEP, progress=30)
    [second] = job_log(job.pk, "still cloning")

    assert Job.objects.get(pk=job.pk).progress == 30
    assert list(job.events.all()) == [first, second]
    assert (first.kind, first.progress) == (JobEvent.Kind.STEP, 30)
    assert (second.kind, second.progress) == (JobEvent.Kind.LOG, None)


def test_job_log_refuses_a_progress_that_is_not_a_percentage(guest: Guest) -> None:
    job = job_open(kind=Job.Kind.PROVISION, guest=guest)
    with pytest.raises(ValueError, match="percentage"):
        job_log(job.pk, "too far", progress=101)
    assert job.events.count() == 0


def test_job_open_on_a_busy_guest_names_the_running_job(guest: Guest) -> None:
    busy = job_open(kind=Job.Kind.FORCE_OFF, guest=guest)
    job_move(busy.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)

    with pytest.raises(GuestBusy) as caught:
        job_open(kind=Job.Kind.START, guest=guest)

    assert str(caught.value) == (
        f"web1 is busy with force off job #{busy.pk}; try again when it finishes"
    )
    assert caught.value.job == busy
    assert Job.objects.filter(guest=guest).count() == 1


def test_job_open_works_again_once_the_job_finishes(guest: Guest) -> None:
    first = job_open(kind=Job.Kind.SHUTDOWN, guest=guest)
    job_move(first.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)
    job_move(first.pk, expected=JobStatus.RUNNING, to=JobStatus.SUCCEEDED)

    second = job_open(kind=Job.Kind.START, guest=guest, data={"paused": False})

    assert second.pk != first.pk
    assert (second.status, second.data) == (JobStatus.QUEUED, {"paused": False})


def test_a_refused_job_open_leaves_the_callers_transaction_usable(guest: Guest) -> None:
    job_open(kind=Job.Kind.SHUTDOWN, guest=guest)
    with transaction.atomic():
        with pytest.raises(GuestBusy):
            job_open(kind=Job.Kind.START, guest=guest)
        # Without the savepoint this query would fail on PostgreSQL ("transaction aborted").
        assert Job.objects.filter(guest=guest).count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_jobs_opened_at_once_on_one_guest_leave_one_busy(guest: Guest) -> None:
    for _ in range(10):
        outcomes = _race(
            [
                lambda: job_open(kind=Job.Kind.START, guest=guest),
                lambda: job_open(kind=Job.Kind.DELETE, guest=guest),
            ]
        )

        opened = [o for o in outcomes if isinstance(o, Job)]
        refused = [o for o in outcomes if isinstance(o, GuestBusy)]
        assert len(opened) == 1, outcomes
        assert len(refused) == 1, outcomes
        assert refused[0].job == opened[0]
        job_move(opened[0].pk, expected=JobStatus.QUEUED, to=JobStatus.CANCELLED)


def test_jobs_without_a_guest_never_clash(make_request: Callable[..., ProvisioningRequest]) -> None:
    req = make_request()
    one = job_open(kind=Job.Kind.PROVISION, request=req)
    two = job_open(kind=Job.Kind.PROVISION, request=req)
    assert one.pk != two.pk


# Publishing ----------------------------------------------------------------------------------


@pytest.fixture
def subscriber(settings, own_redis: RedisServer) -> Iterator[Callable[[str], redis.client.PubSub]]:
    """Subscribes to channels on the test's own Redis, where the moves publish too."""
    settings.REDIS_URL = own_redis.url
    conn = redis.Redis.from_url(own_redis.url, socket_timeout=5)
    opened: list[redis.client.PubSub] = []

    def subscribe(channel: str) -> redis.client.PubSub:
        pubsub = conn.pubsub()
        pubsub.subscribe(channel)
        # Wait for the confirmation, so nothing published afterwards can be missed.
        confirmation = pubsub.get_message(timeout=5)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        opened.append(pubsub)
        return pubsub

    yield subscribe
    for pubsub in opened:
        pubsub.close()
    conn.close()


def _receive(pubsub: redis.client.PubSub, match: Callable[[dict[str, Any]], bool]) -> dict:
    """The first JSON message that `match` accepts."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0))
        if message is None or message["type"] != "message":
            continue
        payload = json.loads(message["data"])
        if match(payload):
            return payload
    raise AssertionError("no matching message before the deadline")


def test_a_move_is_published_for_live_pages_after_commit(
    make_request: Callable[..., ProvisioningRequest],
    subscriber: Callable[[str], redis.client.PubSub],
    django_capture_on_commit_callbacks,
) -> None:
    req = make_request(Status.PENDING)
    pubsub = subscriber(f"vmportal:request:{req.pk}")
    note = f"admitted {uuid.uuid4()}"

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        request_move(req.pk, expected=Status.PENDING, to=Status.ADMITTED, note=note)
    # Nothing is sent while the transaction is open: a page must never see an uncommitted move.
    early = pubsub.get_message(timeout=0.2)
    assert early is None or json.loads(early["data"]).get("note") != note
    for callback in callbacks:
        callback()

    payload = _receive(pubsub, lambda p: p.get("note") == note)
    assert payload["request"] == req.pk
    assert (payload["from"], payload["status"]) == ("pending", "admitted")
    assert payload["at"].startswith(str(ProvisioningRequest.objects.get(pk=req.pk).updated.year))


@pytest.mark.django_db(transaction=True)
def test_job_changes_are_published_once_really_committed(
    guest: Guest, subscriber: Callable[[str], redis.client.PubSub]
) -> None:
    job = job_open(kind=Job.Kind.PROVISION, guest=guest)
    pubsub = subscriber(f"vmportal:job:{job.pk}")
    line = f"step {uuid.uuid4()}"

    job_move(job.pk, expected=JobStatus.QUEUED, to=JobStatus.RUNNING)
    [event] = job_log(job.pk, line, kind=JobEvent.Kind.STEP, progress=55)

    moved = _receive(pubsub, lambda p: p.get("kind") == "state" and p.get("job") == job.pk)
    assert (moved["from"], moved["status"]) == ("queued", "running")
    logged = _receive(pubsub, lambda p: p.get("message") == line)
    assert (logged["event"], logged["progress"], logged["kind"]) == (event.pk, 55, "step")


def test_a_dead_redis_does_not_fail_a_move(
    make_request: Callable[..., ProvisioningRequest],
    settings,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks,
) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    req = make_request(Status.PENDING)

    with (
        caplog.at_level(logging.WARNING, logger="provisioning.services.transitions"),
        django_capture_on_commit_callbacks(execute=True) as callbacks,
    ):
        request_move(req.pk, expected=Status.PENDING, to=Status.ADMITTED)

    assert len(callbacks) == 1
    assert ProvisioningRequest.objects.get(pk=req.pk).status == Status.ADMITTED
    assert f"could not publish on vmportal:request:{req.pk}" in caplog.text
