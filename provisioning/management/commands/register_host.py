"""Registers a hypervisor host (and its pool for guest disks), after checking that it answers."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from provisioning.hypervisor import storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import NAME_VALIDATOR, Host, StoragePool


class Command(BaseCommand):
    help = "Register (or update) a hypervisor host by name and libvirt URI, and check it."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name")
        parser.add_argument("uri")
        parser.add_argument("--vcpus", type=int, help="capacity; default: the host's CPUs")
        parser.add_argument("--memory-mib", type=int, help="capacity; default: the host's memory")
        parser.add_argument("--disk-gib", type=int, default=100)
        parser.add_argument("--pool", default="vmportal", help="storage pool for guest disks")
        parser.add_argument("--pool-path", default="/var/lib/libvirt/images/vmportal")
        parser.add_argument("--disabled", action="store_true")

    def handle(self, *args: Any, name: str, uri: str, **o: Any) -> None:
        try:
            NAME_VALIDATOR(name)
        except Exception as exc:
            raise CommandError(f"bad host name {name!r}: use letters, digits, . _ -") from exc
        hv = get_hypervisor(uri)
        try:
            info = hv.host_info()
            storage.ensure_dir_pool(hv, o["pool"], o["pool_path"])
        except HypervisorError as exc:
            raise CommandError(f"host {name} at {uri} does not answer: {exc}") from exc
        host, created = Host.objects.update_or_create(
            name=name,
            defaults={
                "uri": uri,
                "enabled": not o["disabled"],
                "capacity_vcpus": o["vcpus"] or info.cpus,
                "capacity_memory_mib": o["memory_mib"] or info.memory_kib // 1024,
                "capacity_disk_gib": o["disk_gib"],
            },
        )
        StoragePool.objects.update_or_create(
            host=host, name=o["pool"], defaults={"path": o["pool_path"]}
        )
        self.stdout.write(
            f"host {name} {'registered' if created else 'updated'}: {uri}, libvirt "
            f"{info.lib_version}, {host.capacity_vcpus} vCPUs, {host.capacity_memory_mib} MiB; "
            f"its worker consumes the queue {host.queue}"
        )
