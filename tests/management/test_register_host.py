"""`register_host` registers a host (and its pool) after checking that its libvirt answers."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

import pytest
from django.core.management import CommandError, call_command

from provisioning.hypervisor import storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Host, StoragePool
from tests.support.libvirt import TEST_URI


@pytest.fixture
def driver_pool() -> Iterator[str]:
    """A pool name on this process's test driver, removed afterwards."""
    name = f"hosts-reg-{secrets.token_hex(3)}"
    hv = get_hypervisor(TEST_URI)  # held open: the driver keeps its state while a client is
    yield name
    storage.remove_pool(hv, name)


def test_register_host_registers_and_checks_a_host(db: None, driver_pool: str) -> None:
    out = io.StringIO()
    path = f"/{driver_pool}"

    call_command(
        "register_host", "extra", TEST_URI, "--pool", driver_pool, "--pool-path", path, stdout=out
    )
    again = io.StringIO()
    call_command(
        "register_host",
        "extra",
        TEST_URI,
        "--pool",
        driver_pool,
        "--pool-path",
        path,
        "--memory-mib",
        "2048",
        "--disabled",
        stdout=again,
    )

    host = Host.objects.get(name="extra")
    info = get_hypervisor(TEST_URI).host_info()
    assert f"host extra registered: {TEST_URI}" in out.getvalue()
    assert "its worker consumes the queue hv.extra" in out.getvalue()
    assert "host extra updated" in again.getvalue()
    assert (host.uri, host.capacity_vcpus, host.capacity_memory_mib) == (TEST_URI, info.cpus, 2048)
    assert host.enabled is False
    assert list(host.pools.values_list("name", "path")) == [(driver_pool, path)]
    assert storage.get_pool(get_hypervisor(TEST_URI), driver_pool).active


def test_register_host_refuses_an_unreachable_uri_with_a_clear_message(db: None) -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/vmportal/libvirt-sock"

    with pytest.raises(CommandError) as refused:
        call_command("register_host", "ghost", uri, stdout=io.StringIO())

    assert str(refused.value).startswith(f"host ghost at {uri} does not answer:")
    assert not Host.objects.filter(name="ghost").exists()
    assert not StoragePool.objects.exists()


def test_register_host_refuses_a_bad_name(db: None) -> None:
    with pytest.raises(CommandError, match="bad host name"):
        call_command("register_host", "no spaces", TEST_URI, stdout=io.StringIO())
    assert not Host.objects.exists()
