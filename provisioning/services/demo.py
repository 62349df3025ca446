"""Demo content: the tiny real guest registered as a template, with a storage pool for disks."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import transaction

from provisioning.demo import tinyguest
from provisioning.hypervisor import storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import GuestTemplate, Host, Media, StoragePool
from provisioning.services.hosts import host_domain_type
from provisioning.services.templates import template_saved

DEMO_TEMPLATE_NAME = "Tiny Linux (direct kernel boot)"
DEMO_MEDIA_NAME = "Tiny Linux kernel + installer initrd"
DEMO_POOL_NAME = "vmportal"
DEMO_POOL_PATH = Path("/var/lib/libvirt/images/vmportal")
BOOT_DIR = Path("/var/lib/libvirt/boot/vmportal")


def _publish(src: Path, dest: Path) -> None:
    """Copy src to dest when it differs, atomically, where QEMU may read it."""
    same_size = dest.exists() and dest.stat().st_size == src.stat().st_size
    if same_size and dest.read_bytes() == src.read_bytes():
        return
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    tmp.replace(dest)


def demo_seed(*, host: Host, log: Callable[[str], None] = print) -> GuestTemplate:
    """Build the tiny guest (cached) and register its pool, media and template on `host`."""
    guest = tinyguest.cached(settings.DEMO_DIR)
    if guest is None:
        log("demo: building the tiny guest from Debian packages (first run only)")
        guest = tinyguest.build(settings.DEMO_DIR, log=log)
    BOOT_DIR.mkdir(parents=True, exist_ok=True)
    kernel, initrd = BOOT_DIR / "tiny-vmlinuz", BOOT_DIR / "tiny-initrd.img"
    _publish(guest.kernel, kernel)
    _publish(guest.initrd, initrd)

    storage.ensure_dir_pool(get_hypervisor(host.uri), DEMO_POOL_NAME, str(DEMO_POOL_PATH))
    domain_type = host_domain_type(host=host, kernel=(str(kernel), str(initrd)))
    log(f"demo: guests on {host} run with domain type '{domain_type}'")

    with transaction.atomic():
        pool, _ = StoragePool.objects.update_or_create(
            host=host, name=DEMO_POOL_NAME, defaults={"path": str(DEMO_POOL_PATH)}
        )
        media, _ = Media.objects.update_or_create(
            name=DEMO_MEDIA_NAME,
            defaults={
                "kind": Media.Kind.KERNEL,
                "kernel_path": str(kernel),
                "initrd_path": str(initrd),
                "description": f"Debian kernel {guest.kernel_version} with a busybox installer.",
            },
        )
        template, created = GuestTemplate.objects.get_or_create(
            name=DEMO_TEMPLATE_NAME,
            defaults={
                "description": (
                    "A tiny real Linux guest. Its installer writes a marker to the disk and "
                    "powers off; the installed guest boots from its disk and shows the marker on "
                    "its serial console. Installs in about 15-30 s under software emulation."
                ),
                "method": GuestTemplate.Method.KERNEL,
                "lifecycle": GuestTemplate.Lifecycle.INSTALL,
                "media": media,
                "pool": pool,
                "kernel_cmdline": tinyguest.install_cmdline("installed"),
                "vcpus_min": 1,
                "vcpus_default": 1,
                "vcpus_max": 2,
                "memory_mib_min": 128,
                "memory_mib_default": 256,
                "memory_mib_max": 1024,
                "disk_mib_min": tinyguest.DISK_MIN_MIB,
                "disk_mib_default": tinyguest.DISK_MIN_MIB,
                "disk_mib_max": 1024,
                "data_disk_mib_max": 256,
                "install_timeout_minutes": 10,
            },
        )
    if created:
        template_saved(template=template, changed=False)
    log(f"demo: template '{template.name}' {'registered' if created else 'present'} on {host}")
    return template
