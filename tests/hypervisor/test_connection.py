"""Connections: lazy, cached per process, repaired when they break."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import libvirt
import pytest

from provisioning.hypervisor import (
    ConnectionLost,
    Hypervisor,
    NotFound,
    event_loop_running,
    forget_hypervisors,
    get_hypervisor,
)
from provisioning.hypervisor.connection import _cache
from tests.support.isolation import ROOT
from tests.support.libvirt import TEST_URI


def lost() -> ConnectionLost:
    return ConnectionLost("socket closed", code=libvirt.VIR_ERR_INTERNAL_ERROR, domain=7)


def test_it_opens_the_connection_only_when_first_used() -> None:
    hv = Hypervisor(TEST_URI)
    assert not hv.is_alive()

    hv.version()

    assert hv.is_alive()
    hv.close()
    assert not hv.is_alive()


def test_it_reports_versions_host_and_uri(test_hv: Hypervisor) -> None:
    version = test_hv.version()

    assert version["uri"] == TEST_URI
    assert version["driver"] == "TEST"
    assert version["lib_version"].count(".") == 2
    assert version["hostname"]
    assert dict(version) == version  # health pages turn it into a dict


def test_it_reports_host_size(test_hv: Hypervisor) -> None:
    info = test_hv.host_info()

    assert info.cpus > 0
    assert info.memory_kib > 0
    assert info.arch
    assert info.as_dict()["uri"] == TEST_URI


def test_it_lists_domain_types_from_the_capabilities(test_hv: Hypervisor) -> None:
    assert test_hv.capabilities_domain_types() == frozenset({"test"})
    assert test_hv.capabilities_domain_types(arch="no-such-arch") == frozenset()


def test_it_runs_the_event_loop_and_keepalive_through_the_daemon(test_hv: Hypervisor) -> None:
    assert event_loop_running()
    # Through libvirtd the remote driver offers both; a local test:/// offers neither.
    assert test_hv.keepalive
    assert test_hv.close_callback


def test_it_tolerates_a_driver_without_keepalive() -> None:
    with Hypervisor("test:///default") as hv:
        assert hv.version()["driver"] == "TEST"
        assert not hv.keepalive


def test_it_caches_one_hypervisor_per_process_uri_and_mode() -> None:
    try:
        hv = get_hypervisor(TEST_URI)

        assert get_hypervisor(TEST_URI) is hv
        assert get_hypervisor(TEST_URI, readonly=True) is not hv
        assert (os.getpid(), TEST_URI, False) in _cache
    finally:
        forget_hypervisors()
    assert (os.getpid(), TEST_URI, False) not in _cache


def _child_report(queue: multiprocessing.Queue) -> None:
    parent_hv = get_hypervisor(TEST_URI)
    queue.put((id(parent_hv), parent_hv.version()["driver"], os.getpid()))


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone() -> None:
    try:
        hv = get_hypervisor(TEST_URI)
        hv.version()
        parent_conn = hv.connection()
        queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=_child_report, args=(queue,))

        child.start()
        child_hv_id, driver, child_pid = queue.get(timeout=30)
        child.join(30)

        assert child.exitcode == 0
        assert driver == "TEST"
        assert child_pid != os.getpid()
        assert child_hv_id != id(hv)
        # The child neither used nor closed the parent's connection.
        assert hv.connection() is parent_conn
        assert hv.version()["driver"] == "TEST"
    finally:
        forget_hypervisors()


def _child_reuses(hv: Hypervisor, queue: multiprocessing.Queue) -> None:
    before = id(hv._conn)
    hv.version()
    queue.put(before != id(hv._conn))


def test_a_hypervisor_carried_across_fork_reconnects_in_the_child() -> None:
    with Hypervisor(TEST_URI) as hv:
        parent_conn = hv.connection()
        ctx = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue = ctx.Queue()
        child = ctx.Process(target=_child_reuses, args=(hv, queue))

        child.start()
        reopened = queue.get(timeout=30)
        child.join(30)

        assert reopened is True
        assert hv.connection() is parent_conn
        assert hv.version()["driver"] == "TEST"


def test_call_retries_a_read_once_after_the_connection_is_lost() -> None:
    with Hypervisor(TEST_URI) as hv:
        first = hv.connection()
        seen: list[libvirt.virConnect] = []

        def flaky(conn: libvirt.virConnect) -> str:
            seen.append(conn)
            if len(seen) == 1:
                # A real loss: the socket is gone, so the probe fails and a new one opens.
                conn.close()
                raise lost()
            return conn.getType()

        assert hv.call(flaky) == "TEST"
        assert len(seen) == 2
        assert seen[1] is not first


def test_call_does_not_repeat_a_mutation_after_the_connection_is_lost() -> None:
    with Hypervisor(TEST_URI) as hv:
        attempts: list[int] = []

        def mutation(conn: libvirt.virConnect) -> None:
            attempts.append(1)
            raise lost()

        with pytest.raises(ConnectionLost):
            hv.call(mutation, idempotent=False)

        assert attempts == [1]


def test_call_does_not_retry_other_errors() -> None:
    with Hypervisor(TEST_URI) as hv:
        attempts: list[int] = []

        def lookup(conn: libvirt.virConnect) -> None:
            attempts.append(1)
            conn.lookupByName("no-such-guest")

        with pytest.raises(NotFound):
            hv.call(lookup)

        assert attempts == [1]


def test_a_close_callback_makes_the_next_use_probe_and_keep_a_healthy_connection() -> None:
    with Hypervisor(TEST_URI) as hv:
        conn = hv.connection()

        hv._on_close(conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)

        assert hv.connection() is conn  # it still answers, so it is kept


def test_a_broken_connection_is_replaced_on_next_use() -> None:
    with Hypervisor(TEST_URI) as hv:
        conn = hv.connection()
        conn.close()  # dead underneath us
        hv.mark_broken()

        replacement = hv.connection()

        assert replacement is not conn
        assert hv.version()["driver"] == "TEST"


def _child_sees(parent: Hypervisor, queue: multiprocessing.Queue) -> None:
    inherited = parent._conn
    with Hypervisor(TEST_URI) as own:
        driver = own.version()["driver"]
        queue.put(
            {
                "detached": inherited is not None and inherited._o is None,
                "loop": event_loop_running(),
                "keepalive": own.keepalive,
                "driver": driver,
            }
        )


def test_a_child_forked_with_connections_open_detaches_them_and_runs_no_event_loop(
    test_hv: Hypervisor,
) -> None:
    test_hv.version()
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = ctx.Queue()
    child = ctx.Process(target=_child_sees, args=(test_hv, queue))

    child.start()
    seen = queue.get(timeout=30)
    child.join(30)

    # Running the loop there would read and write the parent's sockets.
    assert seen == {"detached": True, "loop": False, "keepalive": False, "driver": "TEST"}
    assert test_hv.version()["driver"] == "TEST"


PREFORK_SCRIPT = """
import json, multiprocessing, sys
from provisioning.hypervisor import ensure_event_loop, event_loop_running, get_hypervisor

def child(queue):
    hv = get_hypervisor(sys.argv[1])
    driver = hv.version()["driver"]
    queue.put({"loop": event_loop_running(), "keepalive": hv.keepalive, "driver": driver})

ensure_event_loop()  # like a Celery parent that imported us but opened nothing
ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
proc = ctx.Process(target=child, args=(queue,))
proc.start()
print(json.dumps(queue.get(timeout=30)))
proc.join(30)
"""


def test_a_child_forked_from_a_parent_without_connections_runs_its_own_event_loop() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PREFORK_SCRIPT, TEST_URI],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"loop": True, "keepalive": True, "driver": "TEST"}
