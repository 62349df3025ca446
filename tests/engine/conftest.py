"""Engine fixtures: a host on libvirt's test driver with a pool and templates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import GuestTemplate, Host, Media, StoragePool

TEST_URI = "test+unix:///default"


@pytest.fixture
def test_host(transactional_db: None) -> Iterator[Host]:
    """The local host on the shared test driver; its domains are removed afterwards."""
    hv = get_hypervisor(TEST_URI)  # held open so the driver keeps its state between calls
    before = {d.uuid for d in operations.list_domains(hv)}
    # Room to spare: reconcile counts the test driver's own 8 GiB "test" domain against it.
    host = Host.objects.create(name="local", uri=TEST_URI, capacity_memory_mib=1 << 20)
    StoragePool.objects.create(host=host, name="default-pool", path="/default-pool")
    yield host
    for info in operations.list_domains(hv):
        if info.uuid not in before:
            operations.destroy(hv, info.uuid)
            operations.undefine(hv, info.uuid)


@pytest.fixture
def kernel_template(test_host: Host) -> GuestTemplate:
    media = Media.objects.create(
        name="tiny",
        kind=Media.Kind.KERNEL,
        kernel_path="/var/lib/libvirt/boot/vmportal/tiny-vmlinuz",
        initrd_path="/var/lib/libvirt/boot/vmportal/tiny-initrd.img",
    )
    return GuestTemplate.objects.create(
        name="Tiny (test driver)",
        method=GuestTemplate.Method.KERNEL,
        media=media,
        pool=StoragePool.objects.get(host=test_host),
        kernel_cmdline="console=ttyS0 vmportal.install=1",
        memory_mib_default=256,
        disk_mib_min=64,
        disk_mib_default=64,
        install_timeout_minutes=5,
    )
