"""`seed_demo` builds the tiny guest and registers it, with its pool, on the local host.

The local host is this process's own libvirtd (QEMU driver); the pool's folder,
/var/lib/libvirt/images/vmportal, is shared by every daemon on the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

from provisioning.hypervisor import storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import GuestTemplate, Host, Media, StoragePool
from provisioning.services.demo import DEMO_POOL_NAME, DEMO_TEMPLATE_NAME
from tests.support.libvirt import QEMU_URI

pytestmark = [pytest.mark.qemu, pytest.mark.django_db]


def test_it_registers_the_tiny_guest_template_once(settings, capsys) -> None:
    settings.LIBVIRT_URI = QEMU_URI
    settings.VMPORTAL_DOMAIN_TYPE = "auto"
    call_command("seed_demo")
    call_command("seed_demo")

    host = Host.objects.get()
    assert host.uri == QEMU_URI
    assert host.detected_domain_type in {"kvm", "qemu"}
    template = GuestTemplate.objects.get(name=DEMO_TEMPLATE_NAME)
    assert template.method == GuestTemplate.Method.KERNEL
    assert "vmportal.install=1" in template.kernel_cmdline
    assert template.media is not None and template.media.kind == Media.Kind.KERNEL
    for path in (template.media.kernel_path, template.media.initrd_path):
        assert Path(path).stat().st_size > 1_000_000
    assert StoragePool.objects.filter(host=host, name=DEMO_POOL_NAME).count() == 1
    assert template.pool is not None and template.pool.name == DEMO_POOL_NAME
    pool = storage.get_pool(get_hypervisor(host.uri), DEMO_POOL_NAME)
    assert pool.active
    out = capsys.readouterr().out
    assert f"domain type '{host.detected_domain_type}'" in out
    assert "present on local" in out
